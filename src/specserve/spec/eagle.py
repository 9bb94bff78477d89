"""EAGLE-style draft head: one decoder layer over the target's own features.

For position i the head reads the target's final hidden state f_i (after its final
norm) and the embedding of the next token t_{i+1}, and predicts f_{i+1}. The target's
LM head restricted to a draft vocabulary (the tokens the target emitted most in the
training data, FR-Spec style: on a CPU the full LM head would dominate a small
drafter) turns a predicted feature into draft logits.

Drafting runs the head autoregressively at the feature level and grows a token tree by
cumulative draft log-probability (EAGLE-2): the `top_k` children of the root, then at
each depth the `top_k` best new nodes get their `top_k` best children, and the
`budget` best nodes of all depths (a tree, since a child never scores above its
parent) are proposed. The target verifies the tree in one forward; the engine walks it
with the target's own tokens, so the output is exactly plain decoding's.

The head keeps a small KV cache per sequence slot (one layer). Its entries come from
the target's features, which the engine hands over with `take_hidden` after each
forward (prefill chunks and accepted tokens); draft nodes are written after the real
entries as scratch and never committed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specserve.config import ModelConfig
from specserve.model.layers import AttentionMetadata, DecoderLayer, RMSNorm
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

DEFAULT_EAGLE = PACKAGED_HEADS / "smollm2-135m-instruct-eagle"


class EagleHead(nn.Module):
    """fc([embed(t_{i+1}); f_i]) -> one decoder layer -> norm = predicted f_{i+1}.

    The target's embeddings, rotary table and LM head rows are borrowed (`bind`), not
    stored: the saved head is the fc, the layer, the norm and the draft vocabulary.

    With `feature_layers` (EAGLE-3's idea of reading several target layers) the real
    features also carry those layers' outputs, `[T, hidden * (1 + n)]`: each is
    RMS-normed and a linear `fuse` (zero at the start of training) adds them to f_i. Deeper
    draft steps feed the head's own predictions, `[T, hidden]`, which have no such part.
    """

    kind = "eagle"

    def __init__(self, cfg: ModelConfig, draft_vocab_size: int, feature_layers: Seq[int] = ()) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.config = cfg
        self.feature_layers = tuple(int(i) for i in feature_layers)
        bad = [i for i in self.feature_layers if not 0 <= i < cfg.num_layers]
        if bad or len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature layers must be distinct layers of the target (0..{cfg.num_layers - 1}), "
                             f"got {list(self.feature_layers)}")
        if self.feature_layers:
            self.tap_norms = nn.ModuleList(RMSNorm(hidden, cfg.rms_norm_eps) for _ in self.feature_layers)
            self.fuse = nn.Linear(len(self.feature_layers) * hidden, hidden, bias=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = DecoderLayer(cfg, sliding=False)
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.register_buffer("draft_ids", torch.arange(draft_vocab_size, dtype=torch.long))
        self._target: Any = None
        self._draft_weight: torch.Tensor | None = None
        self._draft_native: Any = None  # the rows on the native LM-head kernel, where the target has it
        self.native: Any = None  # specserve.model.native.NativeDecoder over `layer`, set at load

    def bind(self, target: Any) -> EagleHead:
        """Borrow the target's embeddings, rotary table and LM head rows of the draft vocabulary."""
        object.__setattr__(self, "_target", target)  # not a submodule: never saved, never trained
        self._draft_weight = bind_lm_rows(target, self.draft_ids)
        self._draft_native = native_rows(target, self._draft_weight)
        return self

    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        feats: torch.Tensor,  # [T, hidden], or [T, hidden * (1 + n)] real features with feature_layers
        positions: torch.Tensor,  # [T]
        meta: Any,  # AttentionMetadata (drafting) or CausalBatch (training)
        k_pool: torch.Tensor | None = None,
        v_pool: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, hidden] predicted next features
        target = self._target
        x = target.embed_tokens(token_ids)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        feats = self.fused(feats.to(x.dtype))
        x = self.fc(torch.cat([x, feats], dim=-1))
        if self.native is not None and self.native.run(x, positions, meta, [k_pool], [v_pool], None):
            return self.native.norm(x, self.norm)
        cos, sin = target.rope.lookup(positions, x.dtype)
        return self.norm(self.layer(x, cos, sin, meta, k_pool, v_pool))

    def fused(self, feats: torch.Tensor) -> torch.Tensor:
        """`[T, hidden]` features as they are; real features with the feature layers' part
        `[T, hidden * (1 + n)]` -> f_i + fuse(normed layer outputs) `[T, hidden]`."""
        hidden = self.config.hidden_size
        if feats.shape[-1] == hidden:
            return feats
        if not self.feature_layers or feats.shape[-1] != hidden * (1 + len(self.feature_layers)):
            raise ValueError(f"features of width {feats.shape[-1]} for a head that reads layers "
                             f"{list(self.feature_layers)} of width {hidden}")
        parts = feats.split(hidden, dim=-1)
        normed = torch.cat([norm(part) for norm, part in zip(self.tap_norms, parts[1:])], dim=-1)
        return parts[0] + self.fuse(normed)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, draft vocab] fp32
        return draft_logits(feats, self._draft_weight, self._draft_native)

    def config_entries(self) -> dict[str, Any]:
        # the target's shapes are all else it needs
        return {"feature_layers": list(self.feature_layers)} if self.feature_layers else {}


def save_head(head: EagleHead, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    save_head_dir(head, out_dir, meta)


def load_head(path: str | os.PathLike[str], target: nn.Module) -> EagleHead:
    """Load a head saved by `save_head` for this target (checked against its shapes)."""
    info, state = read_head_dir(path, target, "eagle")
    try:
        head = EagleHead(target.config, int(info["draft_vocab_size"]), info.get("feature_layers", ()))
    except ValueError as exc:
        raise ValueError(f"eagle:{path}: {exc}") from None
    head.load_state_dict(state)
    return finish_load(head, target, info)


@dataclass
class _State:
    first: int = 0  # the first position with a head cache entry (later ones after a prefix-cache hit)
    length: int = 0  # positions [first, length) hold head cache entries
    pending_start: int = 0
    pending_end: int = 0  # the position after the last pending feature
    pending: list[torch.Tensor] = field(default_factory=list)  # target features from pending_start on

    @property
    def num_pending(self) -> int:
        return self.pending_end - self.pending_start if self.pending else 0


@dataclass
class _Entry:
    slot: int
    start: int  # cache index (within the slot's region, counted from `first`) of the first new row
    read_from: int  # the slot region's first read index in the pool
    token_ids: list[int]
    feats: torch.Tensor  # [n, hidden]; real features with the feature layers' part are wider
    positions: list[int]
    mask: torch.Tensor | None  # [n, start + n] or None (causal)


class EagleDrafter:
    """Token trees from an EAGLE head, for a batch of sequences at once."""

    name = "eagle"
    wants_hidden = True

    #: most feature rows a catch-up runs: where more are pending (a new request's prompt, a
    #: long stretch without drafts), the head's cache restarts at the last WINDOW of them.
    #: Drafting barely reads further back: on second turns whose first turn came from the
    #: prefix cache, the head started 13-15 rows before the end of the prompt and accepted
    #: as many tokens as with the whole prompt (docs/eagle.md).
    WINDOW = 64

    def __init__(
        self, head: EagleHead, num_slots: int, max_len: int, top_k: int = 4, depth: int = 5, window: int | None = None
    ) -> None:
        if top_k < 1 or depth < 1:
            raise ValueError(f"eagle needs top_k >= 1 and depth >= 1, got {top_k}, {depth}")
        self.window = self.WINDOW if window is None else window
        if self.window < 1:
            raise ValueError(f"eagle needs a catch-up window >= 1, got {self.window}")
        self.head = head
        self.top_k = min(top_k, int(head.draft_ids.numel()))
        self.depth = depth
        self.max_len = max_len
        # skip expanding nodes whose children the budget cannot take (the same trees, fewer head
        # forwards where a budget fills up at shallow depths); False expands every depth (tests)
        self.prune = True
        cfg = head.config
        device, dtype = head._draft_weight.device, head._draft_weight.dtype
        if head.native is not None:
            dtype = torch.bfloat16  # the native layer keeps K/V in bf16, as the target's cache
        shape = (cfg.num_kv_heads, num_slots * max_len, cfg.head_dim)
        self.k_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.draft_ids = head.draft_ids.tolist()
        self.feature_layers = head.feature_layers  # target layers whose outputs come with the features
        self.width = cfg.hidden_size * (1 + len(self.feature_layers))  # of each row take_hidden gets
        self._state: dict[str, _State] = {}

    # ------------------------------------------------------------------ features

    def take_hidden(self, request_id: str, start: int, rows: torch.Tensor) -> None:
        """The target's features of positions start, start + 1, ... (just cached); for a head
        with feature layers, each row is followed by those layers' outputs."""
        if rows.shape[-1] != self.width:
            raise ValueError(f"feature rows of width {rows.shape[-1]} for a head that reads {self.width} "
                             f"(the final hidden state and layers {list(self.feature_layers)})")
        st = self._state.setdefault(request_id, _State(start, start, start))
        if st.pending and start == st.pending_end:
            st.pending.append(rows.clone())
            st.pending_end += rows.shape[0]
        else:
            if start < st.first or (not st.pending and start > st.length):
                st.first = st.length = start  # no features before `start` (prefix-cache hit, recompute)
            st.length = min(st.length, start)
            st.pending, st.pending_start, st.pending_end = [rows.clone()], start, start + rows.shape[0]
        if st.num_pending > 4 * self.window:  # long idle: keep what a catch-up would run
            self._keep_window(st)

    def _keep_window(self, st: _State) -> None:
        """Drop pending features before the last `window`; the head's cache restarts there."""
        if st.num_pending <= self.window:
            return
        feats = torch.cat(st.pending)[-self.window :]
        st.pending, st.pending_start = [feats], st.pending_end - self.window
        st.first = st.length = st.pending_start

    def pending_rows(self, view: SequenceView) -> int:
        """Features past the prompt handed over but not yet in the head's cache: rows the
        next call that drafts for this sequence runs first (its catch-up). The prompt's are
        left out: the first draft pays them once and every later one uses them."""
        st = self._state.get(view.request_id)
        if st is None or not st.pending:
            return 0
        return max(0, min(self.window, st.pending_end - max(st.pending_start, view.num_prompt_tokens)))

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        pass  # the accepted tokens' features arrive through take_hidden

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    # ------------------------------------------------------------------ drafting

    @torch.inference_mode()
    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        tokens: list[list[int]] = [[] for _ in seqs]
        parents: list[list[int] | None] = [None] * len(seqs)
        confidence: list[list[float] | None] = [None] * len(seqs)
        active = []
        for i, (view, budget) in enumerate(zip(seqs, budgets)):
            st = self._state.get(view.request_id)
            if budget <= 0 or st is None or not st.pending:
                continue
            # catch-up rows, then at most top_k written nodes per depth
            room = self.max_len - st.pending_end - self.top_k * self.depth
            if room < 0 or st.pending_start != st.length:
                continue
            active.append(i)
        if not active:
            return DraftProposal(tokens, parents=parents)
        t0 = time.perf_counter()
        for i in active:
            self._keep_window(self._state[seqs[i].request_id])
        rows = sum(self._state[seqs[i].request_id].num_pending for i in active)
        roots = self._catch_up([seqs[i] for i in active])
        catch_up = time.perf_counter() - t0
        trees = self._grow([seqs[i] for i in active], roots, [budgets[i] for i in active])
        for i, (tree_tokens, tree_parents, tree_conf) in zip(active, trees):
            tokens[i], parents[i], confidence[i] = tree_tokens, tree_parents, tree_conf
        return DraftProposal(
            tokens, parents=parents, confidence=confidence, catch_up_seconds=catch_up, catch_up_rows=rows
        )

    def _region(self, view: SequenceView) -> int:
        return view.slot * self.max_len

    def _catch_up(self, views: list[SequenceView]) -> torch.Tensor:
        """Head cache entries for the pending features; returns each sequence's predicted
        feature of its last token (the root of its tree) `[A, hidden]`."""
        entries = []
        for view in views:
            st = self._state[view.request_id]
            feats = st.pending[0] if len(st.pending) == 1 else torch.cat(st.pending)
            n, start = feats.shape[0], st.pending_start
            entries.append(_Entry(
                view.slot, start - st.first, self._region(view) + st.first, view.token_ids[start + 1 : start + 1 + n],
                feats, list(range(start, start + n)), None,
            ))
            st.length, st.pending = start + n, []
        out = self._run(entries)
        last = torch.tensor(
            [sum(len(e.token_ids) for e in entries[: j + 1]) - 1 for j in range(len(entries))], device=out.device
        )
        return out.index_select(0, last)

    def _grow(self, views: list[SequenceView], roots: torch.Tensor, budgets: list[int]):
        """EAGLE-2 expansion for every sequence at once; returns (tokens, parents, confidence)
        per sequence."""
        K = self.top_k
        A = len(views)
        # node lists per sequence: token (draft-vocab index), parent node (-1 = root), score, depth
        node_tok: list[list[int]] = [[] for _ in range(A)]
        node_par: list[list[int]] = [[] for _ in range(A)]
        node_score: list[list[float]] = [[] for _ in range(A)]
        written: list[list[int]] = [[] for _ in range(A)]  # expanded nodes, in head-cache order
        ancestors: list[dict[int, list[int]]] = [{} for _ in range(A)]  # written node -> written ancestors + self

        def best(feats: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
            top = torch.topk(torch.log_softmax(self.head.logits(feats), dim=-1), K)
            return top.values.tolist(), top.indices.tolist()

        def add_children(a: int, parent: int, base: float, scores: list[float], toks: list[int]) -> list[int]:
            ids = []
            for s, t in zip(scores, toks):
                ids.append(len(node_tok[a]))
                node_tok[a].append(t)
                node_par[a].append(parent)
                node_score[a].append(base + s)
            return ids

        scores, toks = best(roots)
        frontier = [add_children(a, -1, 0.0, scores[a], toks[a]) for a in range(A)]
        parent_feat = [{n: roots[a] for n in frontier[a]} for a in range(A)]
        depth = min(self.depth, max(budgets))
        for d in range(1, depth):
            entries, expand = [], []
            for a, view in enumerate(views):
                if d >= budgets[a]:
                    continue
                st = self._state[view.request_id]
                chosen = sorted(frontier[a], key=lambda n: -node_score[a][n])[:K]
                if self.prune and len(node_score[a]) >= budgets[a]:
                    # a child scores at most its parent and loses ties to earlier nodes: a node
                    # not above the budget-th best score so far has no child `_select` would take
                    bar = sorted(node_score[a], reverse=True)[budgets[a] - 1]
                    chosen = [n for n in chosen if node_score[a][n] > bar]
                    if not chosen:
                        frontier[a] = []
                        continue
                real = st.length - st.first
                start = real + len(written[a])
                mask = torch.zeros(len(chosen), start + len(chosen), dtype=torch.bool)
                mask[:, :real] = True
                for r, n in enumerate(chosen):
                    p = node_par[a][n]
                    anc = ([*ancestors[a][p]] if p >= 0 else []) + [start + r]
                    ancestors[a][n] = anc
                    for w in anc:
                        mask[r, w] = True
                written[a].extend(chosen)
                feats = torch.stack([parent_feat[a][n] for n in chosen])
                pos = st.length + d - 1
                entries.append(_Entry(
                    view.slot, start, self._region(view) + st.first, [self.draft_ids[node_tok[a][n]] for n in chosen],
                    feats, [pos] * len(chosen), mask.to(roots.device),
                ))
                expand.append((a, chosen))
            if not entries:
                break
            out = self._run(entries)
            scores, toks = best(out)
            row = 0
            for a, chosen in expand:
                new = []
                for n in chosen:
                    kids = add_children(a, n, node_score[a][n], scores[row], toks[row])
                    for k in kids:
                        parent_feat[a][k] = out[row]
                    new.extend(kids)
                    row += 1
                frontier[a] = new
        # confidence: every node's draft probability along its path, best first (the
        # proposal's nodes, then those a larger budget would take next)
        return [(*self._select(node_tok[a], node_par[a], node_score[a], budgets[a]),
                 [math.exp(x) for x in sorted(node_score[a], reverse=True)]) for a in range(A)]

    def _select(self, tok: list[int], par: list[int], score: list[float], budget: int) -> tuple[list[int], list[int]]:
        """The `budget` best nodes, each after its parent; returned parents first."""
        order = sorted(range(len(tok)), key=lambda n: -score[n])
        taken: dict[int, int] = {}  # node -> index in the proposal
        out_tok: list[int] = []
        out_par: list[int] = []
        pending = True
        while pending and len(out_tok) < budget:
            pending = False
            for n in order:
                if n in taken or (par[n] >= 0 and par[n] not in taken):
                    continue
                taken[n] = len(out_tok)
                out_tok.append(self.draft_ids[tok[n]])
                out_par.append(taken[par[n]] if par[n] >= 0 else -1)
                pending = True
                break
        return out_tok, out_par

    def _run(self, entries: list[_Entry]) -> torch.Tensor:
        """One head forward over the new rows of every entry; K/V go into the head's pool."""
        device = self.k_pool.device
        ids, feats, positions, writes, query_starts = [], [], [], [], [0]
        for e in entries:
            n = len(e.token_ids)
            ids.extend(e.token_ids)
            feats.append(e.feats)
            positions.extend(e.positions)
            writes.extend(range(e.read_from + e.start, e.read_from + e.start + n))
            query_starts.append(query_starts[-1] + n)
        masks = []
        for e in entries:
            n = len(e.token_ids)
            if e.mask is not None or n == 1 or e.start == 0:
                masks.append(e.mask)
            else:
                mask = torch.ones(n, e.start + n, dtype=torch.bool, device=device)
                mask[:, e.start :] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                masks.append(mask)
        meta = AttentionMetadata(
            query_starts,
            [e.start for e in entries],
            torch.tensor(writes, dtype=torch.long, device=device),
            [e.read_from for e in entries],
            masks,
            [None] * len(entries),
            [e.mask is None for e in entries],
        )
        return self.head(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.cat(feats),
            torch.tensor(positions, dtype=torch.long, device=device),
            meta,
            self.k_pool,
            self.v_pool,
        )
