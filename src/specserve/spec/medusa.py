"""Medusa heads: K small heads that each guess one more token from one target feature.

The target's final hidden state f_p of the last cached token predicts, through its LM
head, the next token t_{p+1} (the step's root, already chosen). Medusa head k reads the
same f_p and predicts t_{p+1+k}: a residual block `x + SiLU(W x + b)` (zero-initialized,
so an untrained head starts as the target's own next-token guess), then the target's LM
head restricted to a draft vocabulary (the tokens the target emitted most, as for the
EAGLE head: on a CPU the full LM head would dominate the drafter).

Drafting costs one batched matmul per layer over all K heads and sequences plus one
draft-vocabulary LM head; nothing is cached per sequence but its last feature. The
proposal is a token tree: head k's top candidates at depth k, the `budget` nodes of
highest summed log-probability (best-first, so every node comes after its parent). The
target verifies the tree in one forward and the engine walks it with the target's own
tokens, so the output is exactly plain decoding's.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence as Seq
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ModelConfig
from specserve.spec.base import DraftProposal, SequenceView
from specserve.spec.heads import (
    PACKAGED_HEADS,
    bind_lm_rows,
    draft_logits,
    finish_load,
    native_rows,
    read_head_dir,
    save_head_dir,
)

DEFAULT_MEDUSA = PACKAGED_HEADS / "smollm2-135m-instruct-medusa"


class MedusaHead(nn.Module):
    """`num_heads` stacks of `num_layers` residual SiLU blocks over one feature."""

    kind = "medusa"

    def __init__(self, cfg: ModelConfig, num_heads: int, draft_vocab_size: int, num_layers: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"medusa needs num_heads >= 1 and num_layers >= 1, got {num_heads}, {num_layers}")
        hidden = cfg.hidden_size
        self.config = cfg
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.weight = nn.Parameter(torch.zeros(num_layers, num_heads, hidden, hidden))  # [L, K, out, in]
        self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, 1, hidden))
        self.register_buffer("draft_ids", torch.arange(draft_vocab_size, dtype=torch.long))
        self._draft_weight: torch.Tensor | None = None
        self._draft_native: Any = None  # the rows on the native LM-head kernel, where the target has it

    def bind(self, target: Any) -> MedusaHead:
        """Borrow the target's LM head rows of the draft vocabulary."""
        self._draft_weight = bind_lm_rows(target, self.draft_ids)
        self._draft_native = native_rows(target, self._draft_weight)
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [K, N, hidden]
        x = feats.to(self.weight.dtype).unsqueeze(0).expand(self.num_heads, -1, -1)
        for layer in range(self.num_layers):
            x = x + F.silu(torch.baddbmm(self.bias[layer], x, self.weight[layer].transpose(1, 2)))
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., draft vocab] fp32
        return draft_logits(x, self._draft_weight, self._draft_native)

    def config_entries(self) -> dict[str, Any]:
        return {"num_medusa_heads": self.num_heads, "num_layers": self.num_layers}


def save_head(head: MedusaHead, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    save_head_dir(head, out_dir, meta)


def load_head(path: str | os.PathLike[str], target: nn.Module) -> MedusaHead:
    """Load Medusa heads saved by `save_head` for this target (checked against its shapes)."""
    info, state = read_head_dir(path, target, "medusa")
    head = MedusaHead(target.config, int(info["num_medusa_heads"]), int(info["draft_vocab_size"]), int(info["num_layers"]))
    head.load_state_dict(state)
    return finish_load(head, target, info)


def best_first_tree(
    scores: list[list[float]], tokens: list[list[int]], budget: int
) -> tuple[list[int], list[int]]:
    """The `budget` nodes of highest summed score in the tree whose depth-d nodes take
    candidate j of row d (`scores[d]` descending): (tokens, parents), parents first."""
    out_tok: list[int] = []
    out_par: list[int] = []
    if not scores or not scores[0]:
        return out_tok, out_par
    # (-score, depth, candidate, parent node); a popped node admits its first child and next sibling
    heap = [(-scores[0][0], 0, 0, -1)]
    while heap and len(out_tok) < budget:
        neg, depth, j, parent = heapq.heappop(heap)
        node = len(out_tok)
        out_tok.append(tokens[depth][j])
        out_par.append(parent)
        base = -neg - scores[depth][j]  # the parent's summed score
        if j + 1 < len(scores[depth]):
            heapq.heappush(heap, (-(base + scores[depth][j + 1]), depth, j + 1, parent))
        if depth + 1 < len(scores):
            heapq.heappush(heap, (neg - scores[depth + 1][0], depth + 1, 0, node))
    return out_tok, out_par


class MedusaDrafter:
    """Token trees from Medusa heads, for a batch of sequences at once."""

    name = "medusa"
    wants_hidden = True

    def __init__(self, head: MedusaHead, top_k: int = 8) -> None:
        if top_k < 1:
            raise ValueError(f"medusa needs top_k >= 1, got {top_k}")
        self.head = head
        self.top_k = min(top_k, int(head.draft_ids.numel()))
        self.draft_ids = head.draft_ids.tolist()
        self._last: dict[str, tuple[int, torch.Tensor]] = {}  # request -> (position, its feature)

    def take_hidden(self, request_id: str, start: int, rows: torch.Tensor) -> None:
        """The target's features of positions start, start + 1, ... (just cached)."""
        self._last[request_id] = (start + rows.shape[0] - 1, rows[-1].clone())

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        pass  # the accepted tokens' features arrive through take_hidden

    def release(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        tokens: list[list[int]] = [[] for _ in seqs]
        parents: list[list[int] | None] = [None] * len(seqs)
        active, feats = [], []
        for i, (view, budget) in enumerate(zip(seqs, budgets)):
            last = self._last.get(view.request_id)
            # the feature must be of the last cached token: the one before the step's root
            if budget > 0 and last is not None and last[0] == len(view.token_ids) - 2:
                active.append(i)
                feats.append(last[1])
        if not active:
            return DraftProposal(tokens, parents=parents)
        logp = torch.log_softmax(self.head.logits(self.head(torch.stack(feats))), dim=-1)  # [K, A, Vd]
        top = torch.topk(logp, self.top_k, dim=-1)
        values = top.values.transpose(0, 1).tolist()  # [A][K][top_k]
        indices = top.indices.transpose(0, 1).tolist()
        for a, i in enumerate(active):
            ids = [[self.draft_ids[j] for j in row] for row in indices[a]]
            tokens[i], parents[i] = best_first_tree(values[a], ids, budgets[i])
        return DraftProposal(tokens, parents=parents)
