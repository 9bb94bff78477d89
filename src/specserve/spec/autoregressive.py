"""Chain drafting with a model: shared by the draft-model and layer-skip drafters."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.sampling.logits import SamplingTensors, logits_to_probs
from specserve.sampling.sampler import sample
from specserve.spec.base import DraftProposal, SequenceView


def draft_chains(
    runner: ModelRunner,
    seqs: Seq[SequenceView],
    budgets: Seq[int],
    first: Seq[ForwardItem | None],
    layer_mask: list[bool] | None = None,
) -> DraftProposal:
    """Draft `budgets[i]` tokens for each sequence, one batched forward per position.

    `first[i]` feeds sequence i's pending tokens (ending with its last token) into the
    runner's cache; its last logits give the first draft. Greedy sequences take the
    argmax; sampling ones draw from q = the draft logits processed with the request's
    temperature/top-k/top-p/min-p (no penalties), using the request's generator, and
    q is returned for the verifier.
    """
    active = [i for i, b in enumerate(budgets) if b > 0 and first[i] is not None]
    tokens: list[list[int]] = [[] for _ in seqs]
    q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    items = [first[i] for i in active]
    any_sampling = any(not seqs[i].params.greedy for i in active)
    params = SamplingTensors.from_params([seqs[i].params for i in active], runner.device) if any_sampling else None
    step = 0
    while active:
        logits, _ = runner.forward(items, layer_mask)  # [len(active), V]
        if params is None:
            chosen = logits.argmax(dim=-1)
            probs = None
        else:
            probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
            chosen = sample(probs, [seqs[i].generator for i in active])
        step += 1
        next_active, next_items, keep = [], [], []
        for row, (i, tok) in enumerate(zip(active, chosen.tolist())):
            tokens[i].append(tok)
            if probs is not None:
                q_rows[i].append(probs[row])
            if step < budgets[i]:
                prev = items[row]
                next_active.append(i)
                next_items.append(ForwardItem(prev.slot, prev.cache_start + len(prev.token_ids), [tok]))
                keep.append(row)
        if params is not None and keep and len(keep) != len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=runner.device)
            params = SamplingTensors(*(getattr(params, f)[idx] for f in params.__dataclass_fields__))
        active, items = next_active, next_items
    probs_out = [torch.stack(rows) if rows else None for rows in q_rows]
    return DraftProposal(tokens, probs_out)
