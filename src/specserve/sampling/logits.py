"""Row-vectorised logits processing: penalties, then logits -> probabilities.

Every function works on a ``[N, V]`` matrix of logits where each row carries
its own parameters and token history.  The same code therefore serves plain
decoding (one row per sequence) and speculative verification (one row per
draft position: row ``j`` of a sequence sees its history plus the first ``j``
draft tokens, see :func:`draft_token_counts`).

Per-row parameters may be given as Python scalars (shared by all rows), as
sequences of length ``N`` or as tensors of shape ``[N]``.

Pipeline (same order as vLLM / HF ``generate``)::

    logits --apply_penalties--> penalised logits --logits_to_probs--> probs
             repetition, then                       temperature, top-k,
             frequency & presence                   top-p, min-p, renormalise
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from .params import SamplingParams

#: A per-row parameter: one value for every row, N values, or a ``[N]`` tensor.
RowParam = Union[float, int, Sequence[float], Sequence[int], torch.Tensor]

#: Temperatures below this are treated as greedy (dividing by them would
#: overflow float32 and the distribution is one-hot in the limit anyway).
GREEDY_TEMPERATURE_EPS = 1e-5

#: Use a partial ``topk`` instead of a full sort for top-p when at most
#: ``V // PARTIAL_SORT_FRACTION`` tokens per row can survive top-k.
PARTIAL_SORT_FRACTION = 8

#: Size of the sorted prefix tried before falling back to a full sort in
#: top-p (LLM distributions almost always reach ``top_p`` within it).
TOP_P_CANDIDATES = 1024


def _row_tensor(
    value: RowParam, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Broadcast a per-row parameter to a ``[n]`` tensor."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"per-row parameter must have shape [{n}], got {list(t.shape)}")
        return t
    if isinstance(value, numbers.Number):
        return torch.full((n,), value, dtype=dtype, device=device)
    t = torch.tensor(list(value), dtype=dtype, device=device)
    if t.shape != (n,):
        raise ValueError(f"per-row parameter must have {n} values, got {t.numel()}")
    return t


# --------------------------------------------------------------------------- #
# Token histories
# --------------------------------------------------------------------------- #


def build_token_counts(
    histories: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Count token occurrences per row: ``out[i, t] = histories[i].count(t)``.

    Ids outside ``[0, vocab_size)`` (e.g. padding, or tokenizer ids the LM
    head cannot produce) are ignored.  Built with a single ``scatter_add_``
    over one flat index tensor.

    Returns:
        ``[N, V]`` counts, ``N = len(histories)``.
    """
    n = len(histories)
    counts = torch.zeros(n * vocab_size, dtype=dtype, device=device)  # [N*V]
    lengths = [len(h) for h in histories]
    if sum(lengths) == 0:
        return counts.view(n, vocab_size)
    tokens = torch.tensor(
        list(itertools.chain.from_iterable(histories)), dtype=torch.long, device=device
    )  # [T]
    rows = torch.repeat_interleave(
        torch.arange(n, device=device), torch.tensor(lengths, device=device)
    )  # [T]
    valid = (tokens >= 0) & (tokens < vocab_size)
    flat = rows[valid] * vocab_size + tokens[valid]
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=dtype))
    return counts.view(n, vocab_size)


def build_token_mask(
    histories: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[N, V]`` bool: whether token ``t`` occurs in ``histories[i]``."""
    return build_token_counts(histories, vocab_size, device) > 0


def draft_token_counts(
    counts: torch.Tensor,  # [B, V] counts of the already-generated output
    draft_tokens: torch.Tensor,  # [B, K] draft tokens proposed after it
) -> torch.Tensor:
    """Per-position output counts for speculative verification.

    Position ``j`` (``0 <= j <= K``) of sequence ``b`` is scored by the target
    model after the first ``j`` draft tokens, so its penalties must see
    ``counts[b] + count(draft_tokens[b, :j])``.  Draft ids outside ``[0, V)``
    (padding) are ignored.

    Returns:
        ``[B, K + 1, V]`` counts; ``.flatten(0, 1)`` gives the ``[B*(K+1), V]``
        rows matching a flattened verification batch.
    """
    b, v = counts.shape
    k = draft_tokens.shape[1]
    out = counts.unsqueeze(1).repeat(1, k + 1, 1)  # [B, K+1, V]
    if k == 0:
        return out
    pos = torch.arange(k + 1, device=counts.device)[:, None]  # [K+1, 1]
    idx = torch.arange(k, device=counts.device)[None, :]  # [1, K]
    prefix = (idx < pos).to(counts.dtype)  # [K+1, K]: draft i is before position j
    valid = ((draft_tokens >= 0) & (draft_tokens < v)).to(counts.dtype)  # [B, K]
    src = prefix[None] * valid[:, None, :]  # [B, K+1, K]
    index = draft_tokens.clamp(0, v - 1)[:, None, :].expand(b, k + 1, k)  # [B, K+1, K]
    return out.scatter_add_(2, index, src)


# --------------------------------------------------------------------------- #
# Penalties
# --------------------------------------------------------------------------- #


def apply_penalties(
    logits: torch.Tensor,  # [N, V]
    output_counts: torch.Tensor | None = None,  # [N, V] or [1, V] int counts
    prompt_mask: torch.Tensor | None = None,  # [N, V] or [1, V] bool
    repetition_penalty: RowParam = 1.0,  # [N]
    presence_penalty: RowParam = 0.0,  # [N]
    frequency_penalty: RowParam = 0.0,  # [N]
) -> torch.Tensor:
    """Apply repetition, frequency and presence penalties (vLLM order).

    * Repetition (HF / vLLM): for every token seen in the prompt *or* the
      output, positive logits are divided by the penalty and negative ones
      multiplied by it.
    * Frequency (OpenAI): ``logit -= frequency_penalty * count_in_output``.
    * Presence (OpenAI): ``logit -= presence_penalty`` if the token occurs in
      the output at least once.

    ``output_counts`` / ``prompt_mask`` may have a single row that is
    broadcast to all ``N`` rows (e.g. a shared prompt).  The input is not
    modified.

    Returns:
        ``[N, V]`` float32 penalised logits.
    """
    out = logits.float()  # [N, V]
    n = out.shape[0]
    dev = out.device
    rep = _row_tensor(repetition_penalty, n, torch.float32, dev)  # [N]
    pres = _row_tensor(presence_penalty, n, torch.float32, dev)  # [N]
    freq = _row_tensor(frequency_penalty, n, torch.float32, dev)  # [N]

    if (output_counts is not None or prompt_mask is not None) and bool((rep != 1.0).any()):
        seen = torch.zeros((1, 1), dtype=torch.bool, device=dev)  # broadcasts
        if output_counts is not None:
            seen = seen | (output_counts > 0)
        if prompt_mask is not None:
            seen = seen | prompt_mask.bool()
        rep_col = rep[:, None]  # [N, 1]
        penalised = torch.where(out > 0, out / rep_col, out * rep_col)
        out = torch.where(seen, penalised, out)

    if output_counts is not None:
        do_freq = bool((freq != 0).any())
        do_pres = bool((pres != 0).any())
        if do_freq or do_pres:
            counts = output_counts.to(torch.float32)  # [N, V]
            if do_freq:
                out = out - freq[:, None] * counts
            if do_pres:
                out = out - pres[:, None] * (counts > 0).to(torch.float32)
    return out


# --------------------------------------------------------------------------- #
# Logits -> probabilities
# --------------------------------------------------------------------------- #


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N, V]
    probs = torch.zeros_like(logits, dtype=torch.float32)
    return probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)


def _apply_top_k(
    scaled: torch.Tensor,  # [N, V] temperature-scaled logits
    k: torch.Tensor,  # [N] int64, 0 = disabled (already clamped to < V)
) -> torch.Tensor:
    """Mask logits below each row's k-th largest value (ties are kept, as HF)."""
    kmax = int(k.max())
    top_vals = torch.topk(scaled, kmax, dim=-1).values  # [N, kmax], descending
    kth = top_vals.gather(1, (k.clamp(min=1) - 1)[:, None])  # [N, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -torch.inf))
    return scaled.masked_fill(scaled < kth, -torch.inf)


def _apply_top_p(
    probs: torch.Tensor,  # [N, V] normalised probabilities
    p: torch.Tensor,  # [N] float32 in (0, 1]
    use_p: torch.Tensor,  # [N] bool, rows with p < 1
) -> torch.Tensor:
    """Zero everything outside each row's nucleus.

    Walking tokens in descending probability, a token is kept while the mass
    *before* it is still ``< p``: this keeps the smallest prefix whose
    cumulative probability reaches ``p`` and always keeps the top token. Tokens
    exactly as likely as the last one kept are kept too (as top-k keeps ties), so
    the result does not depend on how a sort orders equal probabilities.

    The full ``O(V log V)`` sort is avoided whenever a sorted prefix provably
    contains every decision that matters, with an identical result:

    * when at most ``V // PARTIAL_SORT_FRACTION`` tokens per row have non-zero
      probability (e.g. after top-k), ``topk`` over those suffices;
    * otherwise the top :data:`TOP_P_CANDIDATES` tokens are tried first: if
      their mass already reaches ``p`` in every row, each token outside them
      has at least ``p`` mass before it and is dropped anyway.
    """
    v = probs.shape[-1]
    alive = int((probs[use_p] > 0).sum(dim=-1).max())
    sorted_probs: torch.Tensor | None = None
    if alive <= v // PARTIAL_SORT_FRACTION:
        sorted_probs = torch.topk(probs, max(alive, 1), dim=-1).values  # [N, alive]
    elif TOP_P_CANDIDATES < v:
        cand_probs = torch.topk(probs, TOP_P_CANDIDATES, dim=-1).values  # [N, C]
        cand_mass = cand_probs.cumsum(dim=-1)
        if bool((cand_mass[:, -1] >= p)[use_p].all()):
            sorted_probs = cand_probs
    if sorted_probs is None:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # [N, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < p[:, None]
    keep_sorted[:, 0] = True  # always keep the most likely token
    # Keep every token as likely as the last one kept: tokens tied at the boundary are
    # kept together, since the order a sort puts ties in depends on the path taken above,
    # and so on the other rows of the batch (a seeded request must not).
    last = keep_sorted.sum(dim=-1, keepdim=True) - 1  # [N, 1]
    threshold = sorted_probs.gather(1, last)  # [N, 1]
    keep = (probs >= threshold) | ~use_p[:, None]
    return probs * keep


def logits_to_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: RowParam,  # [N]
    top_k: RowParam = 0,  # [N], 0 or -1 = disabled
    top_p: RowParam = 1.0,  # [N]
    min_p: RowParam = 0.0,  # [N]
) -> torch.Tensor:
    """Turn (penalised) logits into the sampling distribution of every row.

    Steps, per row: divide by the temperature, keep the top-k logits (ties at
    the k-th value kept), keep the top-p nucleus, drop tokens whose
    probability is below ``min_p * max_prob``, renormalise.  Rows whose
    temperature is 0 (below :data:`GREEDY_TEMPERATURE_EPS`) get a one-hot at
    the argmax of ``logits`` so greedy and sampled rows can share a batch.

    Fast path: when no row uses top-k or top-p, no sort/top-k is performed
    (temperature, softmax and min-p are all ``O(V)``).

    Returns:
        ``[N, V]`` float32 probabilities; each row sums to 1.
    """
    logits = logits.float()
    n, v = logits.shape
    dev = logits.device
    temp = _row_tensor(temperature, n, torch.float32, dev)  # [N]
    greedy = temp < GREEDY_TEMPERATURE_EPS  # [N]
    if bool(greedy.all()):
        return _one_hot_argmax(logits)

    scaled = logits / torch.where(greedy, 1.0, temp)[:, None]  # [N, V]

    k = _row_tensor(top_k, n, torch.long, dev)  # [N]
    k = torch.where((k <= 0) | (k >= v), 0, k)  # 0 = disabled (k >= V keeps all)
    use_k = (k > 0) & ~greedy
    if bool(use_k.any()):
        scaled = _apply_top_k(scaled, torch.where(use_k, k, 0))

    probs = torch.softmax(scaled, dim=-1)  # [N, V]

    p = _row_tensor(top_p, n, torch.float32, dev)  # [N]
    use_p = (p < 1.0) & ~greedy
    if bool(use_p.any()):
        probs = _apply_top_p(probs, p, use_p)

    mp = _row_tensor(min_p, n, torch.float32, dev)  # [N]
    use_mp = (mp > 0.0) & ~greedy
    if bool(use_mp.any()):
        threshold = (mp * use_mp)[:, None] * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)

    if bool(use_p.any()) or bool(use_mp.any()):
        probs = probs / probs.sum(dim=-1, keepdim=True)

    if bool(greedy.any()):
        probs = torch.where(greedy[:, None], _one_hot_argmax(logits), probs)
    return probs


# --------------------------------------------------------------------------- #
# Batched parameters and convenience entry points
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class SamplingTensors:
    """The numeric fields of N :class:`SamplingParams` as ``[N]`` tensors."""

    temperature: torch.Tensor  # [N] float32
    top_k: torch.Tensor  # [N] int64
    top_p: torch.Tensor  # [N] float32
    min_p: torch.Tensor  # [N] float32
    repetition_penalty: torch.Tensor  # [N] float32
    presence_penalty: torch.Tensor  # [N] float32
    frequency_penalty: torch.Tensor  # [N] float32

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str | None = None
    ) -> SamplingTensors:
        """One row per entry of ``params`` (repeat an entry for several rows)."""

        def col(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(sp, name) for sp in params], dtype=dtype, device=device)

        return cls(
            temperature=col("temperature", torch.float32),
            top_k=col("top_k", torch.long),
            top_p=col("top_p", torch.float32),
            min_p=col("min_p", torch.float32),
            repetition_penalty=col("repetition_penalty", torch.float32),
            presence_penalty=col("presence_penalty", torch.float32),
            frequency_penalty=col("frequency_penalty", torch.float32),
        )


class ProcessedLogits(NamedTuple):
    """Result of :func:`process` / :func:`process_batch`."""

    logits: torch.Tensor  # [N, V] float32 penalised logits (input for logprobs)
    probs: torch.Tensor  # [N, V] float32 sampling distribution


def process_batch(
    logits: torch.Tensor,  # [N, V]
    params: SamplingTensors,  # [N] per field
    output_counts: torch.Tensor | None = None,  # [N, V] or [1, V]
    prompt_mask: torch.Tensor | None = None,  # [N, V] or [1, V]
) -> ProcessedLogits:
    """Penalties then :func:`logits_to_probs` for a mixed batch."""
    return _penalise_then_warp(logits, params, output_counts, prompt_mask)


def _penalise_then_warp(
    logits: torch.Tensor,  # [N, V]
    params: SamplingParams | SamplingTensors,  # scalars, or [N] per field
    output_counts: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
) -> ProcessedLogits:
    penalised = apply_penalties(
        logits,
        output_counts,
        prompt_mask,
        params.repetition_penalty,
        params.presence_penalty,
        params.frequency_penalty,
    )
    probs = logits_to_probs(penalised, params.temperature, params.top_k, params.top_p, params.min_p)
    return ProcessedLogits(penalised, probs)


def process(
    logits: torch.Tensor,  # [N, V]
    params: SamplingParams,
    output_tokens: Sequence[Sequence[int]] | None = None,  # N (or 1, broadcast) histories
    prompt_tokens: Sequence[Sequence[int]] | None = None,  # N (or 1, broadcast) prompts
) -> ProcessedLogits:
    """Process logits when every row shares one :class:`SamplingParams`.

    ``output_tokens[i]`` is the generated-token history of row ``i`` (for
    speculative verification: the output so far plus the draft prefix);
    ``prompt_tokens[i]`` its prompt.  Either may hold a single history shared
    by all rows.  Histories are only turned into counts when a penalty
    actually needs them.
    """
    n, v = logits.shape
    dev = logits.device
    for name, hist in (("output_tokens", output_tokens), ("prompt_tokens", prompt_tokens)):
        if hist is not None and len(hist) not in (1, n):
            raise ValueError(f"{name} must hold 1 or {n} histories, got {len(hist)}")
    needs_rep = params.repetition_penalty != 1.0
    needs_out = needs_rep or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    output_counts = (
        build_token_counts(output_tokens, v, dev) if needs_out and output_tokens else None
    )
    prompt_mask = build_token_mask(prompt_tokens, v, dev) if needs_rep and prompt_tokens else None
    return _penalise_then_warp(logits, params, output_counts, prompt_mask)
