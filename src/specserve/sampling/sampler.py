"""Drawing tokens from processed distributions, and OpenAI-style logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


def make_generator(
    seed: int | None, device: torch.device | str | None = None
) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (``None`` if no seed).

    Create one per request and keep it for the request's lifetime so its
    samples are reproducible regardless of how it is batched.
    """
    if seed is None:
        return None
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(seed)
    return gen


def sample(
    probs: torch.Tensor,  # [N, V] float, rows sum to 1 (up to rounding)
    generators: Sequence[torch.Generator | None] | None = None,  # N entries
    greedy: torch.Tensor | None = None,  # [N] bool
    uniforms: torch.Tensor | None = None,  # [N] float64, NaN = draw as without it
) -> torch.Tensor:
    """Draw one token per row; returns ``[N]`` int64 token ids.

    Inverse-CDF sampling: one uniform ``u`` per row, then the first token
    whose float64 cumulative probability exceeds ``u * total``.  This costs
    one random number per row (an ``O(V)`` cumsum dominates) and never picks
    a zero-probability token.  Row ``i`` draws ``u`` from ``generators[i]``
    when given, so a seeded request gets the same tokens however it is
    batched; rows without a generator share one draw from the default
    generator.

    ``uniforms[i]``, where not NaN, is row i's uniform (counter-based numbers of
    seeded requests, see :mod:`specserve.sampling.rng`).

    Greedy rows (``greedy[i]``; by default, rows whose distribution is
    one-hot, as produced by ``logits_to_probs`` for temperature 0) take the
    argmax.  If every row is greedy no random numbers are drawn.
    """
    n = probs.shape[0]
    dev = probs.device
    if generators is None:
        generators = [None] * n
    elif len(generators) != n:
        raise ValueError(f"expected {n} generators, got {len(generators)}")
    if greedy is None:
        greedy = probs.amax(dim=-1) >= 1.0  # [N]
    if bool(greedy.all()):
        return probs.argmax(dim=-1)

    u = torch.rand(n, dtype=torch.float64, device=dev)  # [N]
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand((), dtype=torch.float64, device=dev, generator=gen)
    if uniforms is not None:
        u = torch.where(torch.isnan(uniforms), u, uniforms.to(dev))
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [N, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [N, 1]
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [N]
    sampled = sampled.clamp_(max=probs.shape[-1] - 1)
    if not bool(greedy.any()):
        return sampled  # no argmax to take (a [N, V] pass)
    return torch.where(greedy, probs.argmax(dim=-1), sampled)


class Logprobs(NamedTuple):
    """OpenAI ``logprobs`` payload for N positions."""

    token_logprobs: torch.Tensor  # [N] float32, logprob of the chosen token
    top_token_ids: torch.Tensor  # [N, k] int64, most likely tokens, descending
    top_logprobs: torch.Tensor  # [N, k] float32, their logprobs


def compute_logprobs(
    logits: torch.Tensor,  # [N, V] penalised logits (ProcessedLogits.logits)
    token_ids: torch.Tensor,  # [N] chosen tokens
    k: int = 0,
) -> Logprobs:
    """Logprob of each chosen token plus the top-``k`` alternatives.

    Logprobs are ``log_softmax`` of the model logits *after* repetition /
    presence / frequency penalties but *before* temperature, top-k, top-p and
    min-p.  This is the model's own (penalised) belief, so values are finite
    for every token, comparable across requests with different sampling
    settings, and meaningful for greedy requests (temperature 0 would
    otherwise make them all 0 / -inf); truncation would instead report
    ``-inf`` for plausible alternatives.  This matches vLLM's default of
    reporting logprobs independent of the sampling transforms.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.long().view(-1, 1)).squeeze(1)  # [N]
    k = min(k, logprobs.shape[-1])
    top_lp, top_ids = _top_k_lowest_ids_first(logprobs, k)  # [N, k]
    return Logprobs(chosen, top_ids, top_lp)


def _top_k_lowest_ids_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` with ties in a fixed order: equal values by ascending token id, as
    ``argmax`` breaks them, so a greedy token heads its own top list (``topk`` may
    order and pick ties either way)."""
    top, ids = torch.topk(values, k, dim=-1)
    if k == 0:
        return top, ids
    tied = (values >= top[:, -1:]).sum(dim=-1) > k  # more candidates than k: ties at the k-th
    tied |= (top[:, 1:] == top[:, :-1]).any(dim=-1)  # or ties inside the top k
    for i in tied.nonzero().flatten().tolist():  # one copy to the host
        cand = (values[i] >= top[i, -1]).nonzero().flatten()  # ascending ids
        order = torch.sort(values[i, cand], descending=True, stable=True).indices[:k]
        ids[i] = cand[order]
        top[i] = values[i, ids[i]]
    return top, ids
