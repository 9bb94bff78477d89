"""Lossless verification of speculative drafts (Leviathan et al. 2023, Chen et al. 2023).

One verification step, for a batch of ``B`` sequences where sequence ``i``
proposed ``k_i >= 0`` draft tokens ``d_1..d_k``:

* the target model scored ``[last token, d_1..d_k]`` of every sequence in one
  forward, giving ``k_i + 1`` rows of logits per sequence (row ``j`` is the
  distribution of the token after ``d_1..d_j``);
* :func:`target_distributions` turns those logits into the processed target
  distributions ``p_j`` (penalties see the draft prefix of each row);
* :func:`verify` accepts a prefix of the drafts and emits one more token, so
  every sequence emits between ``1`` and ``k_i + 1`` tokens whose joint
  distribution is exactly that of plain sampling from the target.

Rules, per sequence:

* greedy: accept ``d_j`` while ``d_j == argmax p_j``; at the first mismatch
  (or after all ``k`` drafts) emit ``argmax p_j``. No random numbers.
* sampling with a deterministic drafter (``q`` one-hot at ``d_j``): draw
  ``x_j`` from ``p_j`` with the row's uniform; accept ``d_j`` while
  ``x_j == d_j``, and at the first mismatch emit ``x_j`` (after all ``k``
  drafts, ``x_{k+1}``). Accepting with probability ``p_j(d_j)`` and emitting
  ``p_j`` without ``d_j`` on rejection is exactly the rule below for one-hot
  ``q``, and every emitted token is the one plain sampling would draw with the
  same uniform: with counter-based uniforms a seeded request gives the same
  tokens with or without speculation, whatever the draft lengths.
* sampling with a draft model: accept ``d_j`` with probability ``min(1, p_j(d_j) / q_j(d_j))``;
  at the first rejection emit a token from ``norm(max(0, p_j - q_j))`` (from
  ``p_j`` if that residual is empty); if all drafts are accepted emit a bonus
  token from ``p_{k+1}``. ``q`` is the draft distribution the drafts were
  drawn from, or one-hot at the drafted token for deterministic drafters
  (then the residual is ``p_j`` with ``d_j`` removed).

Flattened (ragged) layout used throughout, ``T = sum_i k_i``, ``R = T + B``::

    draft_token_ids        [T]      sequence i owns [cu[i], cu[i+1])
    target rows            [R, V]   sequence i owns [cu[i] + i, cu[i+1] + i + 1)

:func:`verify` issues a single device-to-host transfer (one ``.tolist()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..spec.tree import path_tokens
from .logits import (
    GREEDY_TEMPERATURE_EPS,
    ProcessedLogits,
    SamplingTensors,
    apply_penalties,
    build_token_counts,
    build_token_mask,
    logits_to_probs,
)
from .params import SamplingParams

__all__ = ["VerifyResult", "inverse_cdf", "target_distributions", "verify"]


@dataclass
class VerifyResult:
    """Outcome of :func:`verify` for a batch of ``B`` sequences."""

    #: Per sequence: the accepted drafts followed by the bonus / recovered
    #: token (``1 <= len(emitted[i]) <= k_i + 1``).
    emitted: list[list[int]]
    #: Per sequence: how many drafts were accepted (``len(emitted[i]) - 1``).
    num_accepted: list[int]

    @property
    def num_emitted(self) -> list[int]:
        """Tokens emitted per sequence."""
        return [len(toks) for toks in self.emitted]


# --------------------------------------------------------------------------- #
# Building blocks (module-level so tests can swap them for biased variants)
# --------------------------------------------------------------------------- #


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as an int64 tensor on ``device`` without a stream sync.

    On CUDA the list goes through pinned memory and an asynchronous copy (a
    plain ``torch.tensor(..., device="cuda")`` waits for the stream).
    """
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _accept(
    p_draft: torch.Tensor,  # [T] float32, p_j(d_j)
    q_draft: torch.Tensor,  # [T] float32, q_j(d_j)
    u: torch.Tensor,  # [T] float64 uniforms in [0, 1)
) -> torch.Tensor:
    """Accept each draft with probability ``min(1, p / q)``; ``q == 0`` rejects.

    ``u * q < p`` is ``u < p / q`` without the division.

    Returns:
        ``[T]`` bool.
    """
    q = q_draft.double()
    return (q > 0) & (u * q < p_draft.double())


def _coupled_accept(
    sampled: torch.Tensor,  # [T] int64, x_j drawn from p_j
    draft: torch.Tensor,  # [T] int64, d_j
) -> torch.Tensor:
    """Deterministic drafts: accept ``d_j`` when the target's own draw is ``d_j``.

    Returns:
        ``[T]`` bool.
    """
    return sampled == draft


def _residual(
    p: torch.Tensor,  # [B, V] target rows at the first rejection
    q_dense: torch.Tensor,  # [B, V] draft rows there (zero where q is one-hot)
    draft_token: torch.Tensor,  # [B] int64, the rejected draft token
    one_hot: torch.Tensor,  # [B] bool, rows whose q is one-hot at draft_token
) -> torch.Tensor:
    """Unnormalised recovery distribution ``max(0, p - q)``.

    For a one-hot ``q`` this is ``p`` with the rejected token zeroed.

    Returns:
        ``[B, V]`` float32, non-negative, possibly all zero in a row.
    """
    res = (p - q_dense).clamp_(min=0.0)  # [B, V]
    idx = draft_token[:, None]  # [B, 1]
    kept = res.gather(1, idx) * (~one_hot)[:, None]  # [B, 1]
    return res.scatter(1, idx, kept)


def inverse_cdf(
    probs: torch.Tensor,  # [B, V] unnormalised non-negative weights, row sums > 0
    u: torch.Tensor,  # [B] float64 uniforms in [0, 1)
) -> torch.Tensor:
    """Draw one token per row with the given uniforms (as :func:`sample` does).

    Never picks a zero-weight token.

    Returns:
        ``[B]`` int64.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [B, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [B, 1]
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [B]
    return token.clamp_(max=probs.shape[-1] - 1)


def _num_accepted(
    accepted: torch.Tensor,  # [T] bool
    num_draft: torch.Tensor,  # [B] int64, k_i
    seq_of_draft: torch.Tensor,  # [T] int64
    pos_of_draft: torch.Tensor,  # [T] int64, j within its sequence
) -> torch.Tensor:
    """Length of each sequence's accepted prefix: its first rejected position, or ``k_i``.

    Returns:
        ``[B]`` int64.
    """
    first = num_draft.clone()  # [B]
    if accepted.numel() == 0:
        return first
    stop = torch.where(accepted, num_draft[seq_of_draft], pos_of_draft)  # [T]
    return first.scatter_reduce_(0, seq_of_draft, stop, reduce="amin", include_self=True)


def _uniforms(
    num_rows: int,
    row_start: Sequence[int],
    num_draft: Sequence[int],
    greedy: Sequence[bool],
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:
    """One uniform per target row: ``k_i`` acceptance tests plus one final draw.

    A sampling sequence with a generator draws its ``k_i + 1`` uniforms from it
    (so a seeded request is reproducible however it is batched); the others
    share one draw from the default generator. Greedy sequences draw nothing.

    Returns:
        ``[R]`` float64.
    """
    sampled = [i for i, g in enumerate(greedy) if not g]
    if any(generators[i] is None for i in sampled):
        u = torch.rand(num_rows, dtype=torch.float64, device=device)  # [R]
    else:
        u = torch.zeros(num_rows, dtype=torch.float64, device=device)  # [R]
    for i in sampled:
        gen = generators[i]
        if gen is None:
            continue
        n = num_draft[i] + 1
        draw = torch.rand(n, dtype=torch.float64, device=gen.device, generator=gen)
        u[row_start[i] : row_start[i] + n] = draw.to(device, non_blocking=device.type == "cuda")
    return u


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #


def verify(
    target_probs: torch.Tensor,  # [R, V] float32, R = sum_i (k_i + 1)
    draft_token_ids: torch.Tensor,  # [T] int64, T = sum_i k_i
    cu_num_draft_tokens: Sequence[int],  # B + 1 offsets into draft_token_ids
    draft_probs: Sequence[torch.Tensor | None] | None,  # B entries of [k_i, V] or None
    greedy: Sequence[bool],  # B
    generators: Sequence[torch.Generator | None] | None = None,  # B
    uniforms: torch.Tensor | None = None,  # [R] float64, NaN = draw as without it
    accept_uniforms: torch.Tensor | None = None,  # [R] float64, NaN = draw as without it
) -> VerifyResult:
    """Verify ragged draft chains against the target distributions.

    Args:
        target_probs: processed target distribution at every verified
            position; row ``j`` of sequence ``i`` (global row
            ``cu[i] + i + j``) is the distribution after ``d_1..d_j``.
        draft_token_ids: the drafts of all sequences, flattened; ids must lie
            in ``[0, V)``.
        cu_num_draft_tokens: ``[0, k_0, k_0 + k_1, ...]``.
        draft_probs: per sequence the draft distribution ``q`` (``[k_i, V]``)
            the drafts were sampled from, or ``None`` for a deterministic
            drafter (one-hot ``q``). ``None`` as a whole: all deterministic.
        greedy: per sequence, whether it decodes greedily.
        generators: per sequence RNG (``None`` entries use the default one).
        uniforms: per target row, the uniform that draws the token emitted at
            that row's position (NaN: none given); seeded requests pass
            counter-based numbers here.
        accept_uniforms: per target row, the uniform of the acceptance test
            against a draft model's q there (NaN: none given). Separate from
            ``uniforms`` so no number decides two things.

    Returns:
        A :class:`VerifyResult` with the emitted tokens per sequence.
    """
    cu = [int(c) for c in cu_num_draft_tokens]
    b = len(cu) - 1
    if b < 0 or cu[0] != 0:
        raise ValueError("cu_num_draft_tokens must start with 0")
    num_draft = [cu[i + 1] - cu[i] for i in range(b)]
    if any(k < 0 for k in num_draft):
        raise ValueError(f"cu_num_draft_tokens must be non-decreasing, got {cu}")
    t = cu[-1]
    r = t + b
    if target_probs.dim() != 2 or target_probs.shape[0] != r:
        raise ValueError(
            f"target_probs must have shape [{r}, V] (sum of k_i + 1 rows), "
            f"got {list(target_probs.shape)}"
        )
    if draft_token_ids.numel() != t:
        raise ValueError(f"expected {t} draft tokens, got {draft_token_ids.numel()}")
    if len(greedy) != b:
        raise ValueError(f"expected {b} greedy flags, got {len(greedy)}")
    if draft_probs is None:
        draft_probs = [None] * b
    elif len(draft_probs) != b:
        raise ValueError(f"expected {b} draft_probs entries, got {len(draft_probs)}")
    if generators is None:
        generators = [None] * b
    elif len(generators) != b:
        raise ValueError(f"expected {b} generators, got {len(generators)}")
    if b == 0:
        return VerifyResult([], [])
    v = target_probs.shape[1]
    dev = target_probs.device
    all_greedy = all(greedy)

    # Dense draft distributions (only sampling sequences use them).
    dense = [
        i
        for i in range(b)
        if draft_probs[i] is not None and not greedy[i] and num_draft[i] > 0
    ]
    dense_row_of_draft = [-1] * t  # [T]: row in q_cat, -1 = one-hot q
    q_rows = 0
    for i in dense:
        q = draft_probs[i]
        assert q is not None
        if tuple(q.shape) != (num_draft[i], v):
            raise ValueError(
                f"draft_probs[{i}] must have shape [{num_draft[i]}, {v}], got {list(q.shape)}"
            )
        dense_row_of_draft[cu[i] : cu[i + 1]] = range(q_rows, q_rows + num_draft[i])
        q_rows += num_draft[i]

    # Host-built index arrays, shipped in one copy.
    row_start = [cu[i] + i for i in range(b)]
    seq_of_draft = [i for i in range(b) for _ in range(num_draft[i])]
    pos_of_draft = [j for i in range(b) for j in range(num_draft[i])]
    meta_lists = [row_start, num_draft, cu[:-1], seq_of_draft, pos_of_draft]
    if not all_greedy:
        meta_lists += [[int(g) for g in greedy], dense_row_of_draft]
    meta = _long_tensor([x for lst in meta_lists for x in lst], dev).split(
        [len(lst) for lst in meta_lists]
    )
    row_start_t, num_draft_t, draft_start_t, seq_t, pos_t = meta[:5]  # [B]x3, [T]x2
    draft_row_t = torch.arange(t, device=dev) + seq_t  # [T]: target row scoring draft t

    to_cuda = dev.type == "cuda"  # host -> device copies need not block
    draft_ids = draft_token_ids.reshape(-1).to(dev, torch.long, non_blocking=to_cuda)  # [T]

    if all_greedy:  # fast path: argmax comparisons only, no random numbers
        argmax = target_probs.argmax(dim=-1)  # [R]
        accepted = draft_ids == argmax[draft_row_t]  # [T]
        n_acc = _num_accepted(accepted, num_draft_t, seq_t, pos_t)  # [B]
        final = argmax[row_start_t + n_acc]  # [B]
    else:
        greedy_t = meta[5].bool()  # [B]
        dense_row_t = meta[6]  # [T]
        probs = target_probs.float()  # [R, V]
        u = _uniforms(r, row_start, num_draft, greedy, generators, dev)  # [R]
        u_tok = u if uniforms is None else torch.where(torch.isnan(uniforms), u, uniforms.to(dev))  # [R]
        u_acc = u if accept_uniforms is None else torch.where(torch.isnan(accept_uniforms), u, accept_uniforms.to(dev))
        # the target's own draw at every row: deterministic drafts are verified against it
        x_all = inverse_cdf(probs, u_tok)  # [R]

        p_draft = probs[draft_row_t, draft_ids]  # [T]
        q_cat: torch.Tensor | None = None
        if dense:
            q_cat = torch.cat(
                [draft_probs[i].to(dev, torch.float32, non_blocking=to_cuda) for i in dense]
            )  # [Td, V]
            is_dense = dense_row_t >= 0  # [T]
            q_at = q_cat[dense_row_t.clamp(min=0), draft_ids]  # [T]
            q_draft = torch.where(is_dense, q_at, torch.ones_like(q_at))  # [T]
        else:
            q_draft = torch.ones_like(p_draft)  # [T]
        accepted = _accept(p_draft, q_draft, u_acc[draft_row_t])  # [T]
        coupled_draft = dense_row_t < 0  # [T] one-hot q
        accepted = torch.where(coupled_draft, _coupled_accept(x_all[draft_row_t], draft_ids), accepted)
        if any(greedy):
            argmax_rows = probs.argmax(dim=-1)  # [R]
            greedy_draft = greedy_t[seq_t]  # [T]
            accepted = torch.where(greedy_draft, draft_ids == argmax_rows[draft_row_t], accepted)
        n_acc = _num_accepted(accepted, num_draft_t, seq_t, pos_t)  # [B]

        final_row = row_start_t + n_acc  # [B]
        p_final = probs[final_row]  # [B, V]
        if not dense:
            # deterministic drafts only: every sampled row emits the target's own draw at
            # its stopping row (coupled acceptance), so no residual is drawn from
            final = torch.where(greedy_t, p_final.argmax(dim=-1), x_all[final_row])  # [B]
        else:  # a draft model's q somewhere (so t > 0): a rejected row draws from the residual
            rejected = n_acc < num_draft_t  # [B]
            rej_idx = (draft_start_t + n_acc).clamp(max=t - 1)  # [B] draft index of rejection
            d_rej = draft_ids[rej_idx]  # [B]
            q_row = dense_row_t[rej_idx]  # [B]
            dense_rej = rejected & (q_row >= 0)  # [B]
            q_final = q_cat[q_row.clamp(min=0)] * dense_rej[:, None]  # [B, V]
            res = _residual(p_final, q_final, d_rej, rejected & ~dense_rej)  # [B, V]
            use_res = rejected & (res.sum(dim=-1) > 0)  # [B]
            dist = torch.where(use_res[:, None], res, p_final)  # [B, V]
            u_final = u[row_start_t + num_draft_t]  # [B] a row no acceptance test used
            if uniforms is not None:  # seeded rows: the uniform of the emitted position
                given = uniforms.to(dev)[final_row]
                u_final = torch.where(torch.isnan(given), u_final, given)
            sampled = inverse_cdf(dist, u_final)  # [B]
            # sequences without a draft model's q emit the target's draw at the stopping row
            has_dense = torch.zeros(b, dtype=torch.bool, device=dev)
            has_dense[torch.tensor(dense, dtype=torch.long, device=dev)] = True
            sampled = torch.where(has_dense, sampled, x_all[final_row])
            final = torch.where(greedy_t, p_final.argmax(dim=-1), sampled)  # [B]

    # The one device -> host transfer.
    flat = torch.cat([draft_ids, final, n_acc]).tolist()
    finals = flat[t : t + b]
    n_list = flat[t + b :]
    emitted = [flat[cu[i] : cu[i] + n_list[i]] + [finals[i]] for i in range(b)]
    return VerifyResult(emitted, n_list)


# --------------------------------------------------------------------------- #
# Target distributions for a verification batch
# --------------------------------------------------------------------------- #


def target_distributions(
    logits: torch.Tensor,  # [R, V], R = sum_i (len(draft_token_ids[i]) + 1)
    params: Sequence[SamplingParams],  # B
    output_ids: Sequence[Sequence[int]],  # B, tokens generated so far
    prompt_ids: Sequence[Sequence[int]],  # B
    draft_token_ids: Sequence[Sequence[int]],  # B ragged draft chains (or trees)
    draft_parents: Sequence[Sequence[int] | None] | None = None,  # B, None = a chain
) -> ProcessedLogits:
    """Processed target distribution of every verified row of a ragged batch.

    Row ``j`` of sequence ``i`` is processed exactly as plain sampling would
    process the next-token logits after ``output_ids[i] + drafts[i][:j]``
    (for a token tree, the drafts on the path from the root to draft ``j - 1``):
    penalties count that history (and ``prompt_ids[i]`` for the repetition
    penalty), then temperature / top-k / top-p / min-p with ``params[i]``.

    Penalty work is skipped entirely when no sequence has a penalty, and only
    penalised sequences' histories are counted. Greedy rows without penalties
    become one-hot argmax rows without going through the sampling transforms.

    Returns:
        ``(penalised_logits [R, V], probs [R, V])`` (a :class:`ProcessedLogits`).
    """
    b = len(params)
    for name, seqs in (
        ("output_ids", output_ids),
        ("prompt_ids", prompt_ids),
        ("draft_token_ids", draft_token_ids),
    ):
        if len(seqs) != b:
            raise ValueError(f"expected {b} entries in {name}, got {len(seqs)}")
    num_rows = [len(d) + 1 for d in draft_token_ids]
    r = sum(num_rows)
    if logits.dim() != 2 or logits.shape[0] != r:
        raise ValueError(f"logits must have shape [{r}, V], got {list(logits.shape)}")
    v = logits.shape[1]
    dev = logits.device
    row_params = [sp for sp, n in zip(params, num_rows) for _ in range(n)]  # R
    logits = logits.float()  # [R, V]

    penalised_seqs = [i for i in range(b) if params[i].has_penalties]
    if penalised_seqs:
        pen = set(penalised_seqs)
        # Counts of the output so far, one row per sequence (empty if unpenalised).
        seq_counts = build_token_counts(
            [output_ids[i] if i in pen else () for i in range(b)], v, dev
        )  # [B, V]
        seq_of_row = _long_tensor(
            [i for i, n in enumerate(num_rows) for _ in range(n)], dev
        )  # [R]
        row_counts = seq_counts.index_select(0, seq_of_row)  # [R, V]
        # Row j of sequence i also sees drafts[i][:j].
        flat_idx: list[int] = []
        start = 0
        for i, drafts in enumerate(draft_token_ids):
            tree = draft_parents[i] if draft_parents is not None else None
            if i in pen:
                for j in range(1, len(drafts) + 1):
                    row = start + j
                    history = drafts[:j] if tree is None else path_tokens(drafts, tree, j - 1)
                    flat_idx.extend(row * v + tok for tok in history if 0 <= tok < v)
            start += num_rows[i]
        if flat_idx:
            idx = _long_tensor(flat_idx, dev)
            row_counts.view(-1).scatter_add_(0, idx, torch.ones_like(idx, dtype=row_counts.dtype))
        prompt_mask = None
        if any(params[i].repetition_penalty != 1.0 for i in penalised_seqs):
            seq_mask = build_token_mask(
                [
                    prompt_ids[i] if params[i].repetition_penalty != 1.0 else ()
                    for i in range(b)
                ],
                v,
                dev,
            )  # [B, V]
            prompt_mask = seq_mask.index_select(0, seq_of_row)  # [R, V]
        st = SamplingTensors.from_params(row_params, device=dev)
        penalised = apply_penalties(
            logits,
            row_counts,
            prompt_mask,
            st.repetition_penalty,
            st.presence_penalty,
            st.frequency_penalty,
        )  # [R, V]
    else:
        penalised = logits

    greedy_rows = [sp.temperature < GREEDY_TEMPERATURE_EPS for sp in row_params]  # R
    if all(greedy_rows):
        probs = torch.zeros_like(penalised)  # [R, V]
        probs.scatter_(1, penalised.argmax(dim=-1, keepdim=True), 1.0)
        return ProcessedLogits(penalised, probs)

    sampled_rows = [j for j, g in enumerate(greedy_rows) if not g]
    sub = [row_params[j] for j in sampled_rows]
    if len(sampled_rows) == r:
        sub_logits = penalised  # [R, V]
    else:
        sel = _long_tensor(sampled_rows, dev)
        sub_logits = penalised.index_select(0, sel)  # [S, V]
    st = SamplingTensors.from_params(sub, device=dev)
    sub_probs = logits_to_probs(sub_logits, st.temperature, st.top_k, st.top_p, st.min_p)
    if len(sampled_rows) == r:
        return ProcessedLogits(penalised, sub_probs)
    probs = torch.zeros_like(penalised)  # [R, V]
    probs.scatter_(1, penalised.argmax(dim=-1, keepdim=True), 1.0)  # greedy rows one-hot
    probs.index_copy_(0, sel, sub_probs)
    return ProcessedLogits(penalised, probs)
