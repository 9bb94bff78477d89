"""SuffixDecoding-style drafting (Oliaro et al. 2024, "SuffixDecoding: A Model-Free
Approach to Speeding Up Large Language Model Inference").

Model-free: no forward pass, no draft distribution (q is one-hot at the proposed
token, so `DraftProposal.probs` entries are None).

Two kinds of bounded-depth suffix tries, both holding every substring of length
<= `max_depth` of their token streams, each node with its exact occurrence count:

* a per-request trie over the request's own context (prompt + output), updated
  incrementally: the drafter keeps the context's "open windows" (the nodes of its
  suffixes of length 1..max_depth - 1); a new token advances each of them by one
  edge (creating the child or bumping its count) and opens a new one at the root,
  so O(max_depth) dict operations per token at most;
* a global trie over earlier requests' outputs (and prompts with
  ``global_include_prompts=True``), fed when a request is released and bounded to
  `max_global_tokens` tokens: when over, the oldest sequences are dropped (down to
  3/4 of the bound, so that rebuilds are amortised) and the trie is rebuilt from the
  retained history (a deque of token lists).

Path compression of unique tails: a substring seen once has a single-chain subtree,
so its node is not expanded; it keeps a pointer into the stream (``src[pos:]``) and
its window needs no more work. The node is expanded one level at a time when a
second occurrence comes through. So a window only stays open while its suffix has
occurred before, and text that does not repeat costs O(1) nodes and work per token
instead of O(max_depth). Readers see lazy tails as chains of count-1 nodes.

Proposing for a context ``x``:

1. match: the longest suffix of ``x`` (length m <= max_depth - 1) that is a path of
   the trie *with a continuation*, i.e. that occurred earlier followed by some
   token. In the request trie the context's own suffix is always a path, but its
   latest occurrence (the suffix itself) has no child yet, so a child can only come
   from an earlier occurrence. "Has a continuation" is monotone in m (a shorter
   suffix inherits every continuation of a longer one): the request trie reads it
   off the open windows (the deepest one), the global trie searches m (galloping
   down, then bisecting) with root walks of <= max_depth edges.
2. chain: from the matched node, repeatedly follow the most frequent child while
   ``child.count / node.count >= min_token_prob``. When the walk hits a node without
   children (the trie's depth limit, or the end of the stored data) it re-anchors:
   it matches again the suffix of (context + chain so far) and goes on from there
   (so chains are not limited to ``max_depth - m`` tokens).
3. length: at most ``min(budget, num_spec_tokens, ceil(alpha * m))`` tokens, so long
   matches (strong evidence of a repeat) propose long chains. Nothing is proposed
   when ``m < min_match``.
4. the request trie and the global trie each give a chain; the one with the higher
   score wins, score = expected number of accepted tokens under the trie's empirical
   distribution, ``sum_i prod_{j <= i} p_j`` (ties: longer match, then the request).

Counts include the occurrence at the very end of a stream (which has no child yet),
so a conditional probability ``child.count / node.count`` is slightly conservative.

Cost per `propose`: O(max_depth) to read the request match, O(max_depth log
max_depth) dict probes for the global match, O(k) for a k-token chain plus a re-match
per re-anchor; per appended token O(max_depth) at most (see above).

Memory: a trie over n tokens has at most ``n * max_depth`` substrings, but only
those occurring twice or more (plus one node per unique tail) are materialised; a
node is a 6-slot object (~80 bytes) and only branching nodes own a children dict
(a node with one child keeps it in `best`). E.g. ~300k nodes for 200k tokens of
phrase-heavy synthetic text.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence as Seq

from specserve.spec.base import DraftProposal, SequenceView, check_budgets
from specserve.validation import require_float, require_int

__all__ = ["SuffixDrafter"]

#: After an eviction the global history holds at most this fraction of its bound.
_GLOBAL_LOW_WATER = 0.75


class _Node:
    """A trie node: the substring spelled by the path from the root.

    `tok` is the label of the edge into the node, `count` the number of occurrences
    of the substring. `best` is the most frequent child (ties go to the child
    incremented last, i.e. the more recent continuation); `children` is a dict
    ``token -> node`` only once the node has two or more children; a single child
    lives in `best` alone.

    Lazy (path-compressed) tail: a node seen once (count 1) below the depth limit
    does not materialise its subtree, which is a single chain anyway; it keeps
    ``src[pos:]`` instead (the stream and the index of the token after its
    occurrence), read up to the depth limit and the end of `src`. A lazy node has
    no materialised children. When a second occurrence reaches it, `_advance`
    materialises one level (the child, itself lazy) and clears `src`.
    """

    __slots__ = ("tok", "count", "children", "best", "src", "pos")

    def __init__(self, tok: int) -> None:
        self.tok = tok
        self.count = 0
        self.children: dict[int, _Node] | None = None
        self.best: _Node | None = None
        self.src: list[int] | None = None
        self.pos = 0

    def child(self, tok: int) -> _Node | None:
        """The materialised child along edge `tok`, or None."""
        children = self.children
        if children is not None:
            return children.get(tok)
        best = self.best
        if best is not None and best.tok == tok:
            return best
        return None


def _advance(parent: _Node, tok: int, depth: int, max_depth: int) -> _Node:
    """Record one more occurrence of edge `tok` below the (materialised) `parent`
    and return the child, at depth `depth`.

    O(1): one dict probe/insert, materialising one level below a lazy child, the
    count bump, and keeping `parent.best` the argmax (counts only grow, so comparing
    the bumped child with the incumbent is enough).
    """
    best = parent.best
    children = parent.children
    if children is not None:
        child = children.get(tok)
        if child is None:
            child = children[tok] = _Node(tok)
    elif best is None:
        child = parent.best = best = _Node(tok)
    elif best.tok == tok:
        child = best
    else:
        child = _Node(tok)
        parent.children = {best.tok: best, tok: child}
    src = child.src
    if src is not None:  # lazy, seen once: materialise its one continuation
        child.src = None
        pos = child.pos
        if pos < len(src):
            grand = _Node(src[pos])
            grand.count = 1
            if depth + 1 < max_depth:
                grand.src = src
                grand.pos = pos + 1
            child.best = grand
    child.count += 1
    if child is not best and child.count >= best.count:  # type: ignore[union-attr]
        parent.best = child
    return child


class _Trie:
    """Bounded-depth suffix trie: every substring of length <= `max_depth` of the
    streams fed to it, with counts. `root.count` is the number of tokens fed.

    A position in the trie is a cursor ``(node, off, depth)``: `off` tokens into the
    lazy tail of `node` (0 = at `node` itself), `depth` the substring's length.
    """

    __slots__ = ("root", "max_depth")

    def __init__(self, max_depth: int) -> None:
        self.root = _Node(-1)
        self.max_depth = max_depth

    @property
    def num_tokens(self) -> int:
        return self.root.count

    def extend(self, windows: list[_Node], src: list[int], start: int) -> list[_Node]:
        """Feed ``src[start:]``, the continuation of the stream `src` whose open
        windows are `windows`, and return the new open windows; pass ``[], src, 0``
        for a new stream. `src` must only ever grow afterwards (lazy nodes keep
        pointing into it).

        Open windows are the nodes of the stream's suffixes of length 1, 2, ... that
        occurred at least twice (``windows[d - 1]`` has depth d), up to depth
        ``max_depth - 1``: a suffix seen once becomes a lazy node and needs no more
        work, one of length `max_depth` is complete. Counts only shrink as the suffix
        grows, so they form a prefix. Cost: O(len(windows) + 1) <= O(max_depth) per
        token, O(1) for text that does not repeat.
        """
        root = self.root
        max_depth = self.max_depth
        for i in range(start, len(src)):
            tok = src[i]
            root.count += 1
            new: list[_Node] = []
            depth = 0
            for parent in (root, *windows):
                depth += 1
                child = _advance(parent, tok, depth, max_depth)
                if child.count >= 2:
                    if depth < max_depth:
                        new.append(child)
                elif depth < max_depth:  # a new substring: lazy from now on
                    child.src = src
                    child.pos = i + 1
            windows = new
        return windows

    def walk(self, tokens: Seq[int], start: int) -> tuple[_Node, int] | None:
        """Cursor ``(node, off)`` spelled by ``tokens[start:]`` (at most
        ``max_depth`` tokens), or None if it is not a path. O(len) probes."""
        if len(tokens) - start > self.max_depth:
            return None
        node = self.root
        off = 0
        for i in range(start, len(tokens)):
            tok = tokens[i]
            src = node.src
            if src is not None:  # inside a lazy tail
                j = node.pos + off
                if j >= len(src) or src[j] != tok:
                    return None
                off += 1
                continue
            children = node.children
            if children is not None:
                nxt = children.get(tok)
                if nxt is None:
                    return None
                node = nxt
            else:
                nxt = node.best
                if nxt is None or nxt.tok != tok:
                    return None
                node = nxt
        return node, off

    def has_next(self, node: _Node, off: int, depth: int) -> bool:
        """Whether the cursor has a continuation (a child, real or lazy)."""
        if depth >= self.max_depth:
            return False
        src = node.src
        if src is not None:
            return node.pos + off < len(src)
        return node.best is not None

    def _probe(self, tokens: Seq[int], length: int) -> tuple[_Node, int] | None:
        """Cursor of the last `length` tokens if it has a continuation, else None."""
        cur = self.walk(tokens, len(tokens) - length)
        if cur is not None and self.has_next(cur[0], cur[1], length):
            return cur
        return None

    def longest_match(
        self, tokens: Seq[int], max_len: int | None = None
    ) -> tuple[_Node | None, int, int]:
        """Longest suffix of `tokens` (at most `max_len` and ``max_depth - 1``
        tokens) that is a path with a continuation.

        Returns the cursor and the length ``(node, off, length)``, ``(None, 0, 0)``
        if none. Having a continuation is monotone in the length (a shorter suffix
        inherits every continuation of a longer one), so: gallop down from the
        longest candidate (lengths hi, hi-1, hi-3, hi-7, ...: one walk when the
        answer is the longest, the common case when re-anchoring) and binary-search
        the last gap. O(max_depth log max_depth) probes at worst.
        """
        hi = min(len(tokens), self.max_depth - 1)
        if max_len is not None:
            hi = min(hi, max_len)
        lo = 0
        found: tuple[_Node, int] | None = None
        gap = 1
        probe = hi
        while probe > 0:  # invariant: every length > hi fails
            cur = self._probe(tokens, probe)
            if cur is not None:
                lo, found = probe, cur
                break
            hi = probe - 1
            probe = max(1, hi - gap + 1) if hi > 0 else 0
            gap *= 2
        while lo < hi:  # lo succeeds (or is 0), every length > hi fails
            mid = (lo + hi + 1) // 2
            cur = self._probe(tokens, mid)
            if cur is not None:
                lo, found = mid, cur
            else:
                hi = mid - 1
        if found is None:
            return None, 0, 0
        return found[0], found[1], lo

    def num_nodes(self) -> int:
        """Materialised nodes below the root (O(nodes); for tests and diagnostics)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            if node.children is not None:
                kids = list(node.children.values())
            elif node.best is not None:
                kids = [node.best]
            else:
                kids = []
            total += len(kids)
            stack.extend(kids)
        return total


class _RequestState:
    """A request's context copy, its trie and the trie's open windows."""

    __slots__ = ("tokens", "num_prompt_tokens", "trie", "windows")

    def __init__(self, max_depth: int) -> None:
        self.tokens: list[int] = []
        self.num_prompt_tokens = 0
        self.trie = _Trie(max_depth)
        self.windows: list[_Node] = []


class SuffixDrafter:
    """Suffix-trie drafter (``name = "suffix"``); see the module docstring.

    Args:
        max_depth: trie depth, the longest substring stored (>= 2); matches are at
            most ``max_depth - 1`` long (a depth-`max_depth` node has no child).
        num_spec_tokens: cap on the tokens proposed per sequence and step (>= 1).
        alpha: adaptive length factor: at most ``ceil(alpha * match_len)`` tokens
            (> 0).
        min_token_prob: stop the chain at the first most-frequent child whose
            ``count / parent count`` is below this (in [0, 1]).
        min_match: propose nothing for matches shorter than this (>= 1, <
            max_depth). Default 2: a single matching token is weak evidence (the
            most frequent follower of a common token), while two already pin down
            most repeats, and ``alpha * 2`` tokens is a cheap bet.
        max_global_tokens: bound on the global history (>= 0; 0 disables it).
        global_include_prompts: also add released requests' prompts (not only their
            outputs) to the global history.
    """

    name = "suffix"

    def __init__(
        self,
        max_depth: int = 24,
        num_spec_tokens: int = 16,
        alpha: float = 1.0,
        min_token_prob: float = 0.1,
        min_match: int = 2,
        max_global_tokens: int = 200_000,
        global_include_prompts: bool = False,
    ) -> None:
        self.max_depth = require_int("max_depth", max_depth, 2)
        self.num_spec_tokens = require_int("num_spec_tokens", num_spec_tokens, 1)
        self.alpha = require_float("alpha", alpha)
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.min_token_prob = require_float("min_token_prob", min_token_prob)
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob!r}")
        self.min_match = require_int("min_match", min_match, 1)
        if self.min_match >= self.max_depth:
            raise ValueError(
                f"min_match must be < max_depth ({self.max_depth}), got {min_match!r}"
            )
        self.max_global_tokens = require_int("max_global_tokens", max_global_tokens, 0)
        if not isinstance(global_include_prompts, bool):
            raise ValueError(
                f"global_include_prompts must be a bool, got {global_include_prompts!r}"
            )
        self.global_include_prompts = global_include_prompts

        self._states: dict[str, _RequestState] = {}
        self._global = _Trie(self.max_depth)
        self._history: deque[list[int]] = deque()
        self._history_tokens = 0

    # ------------------------------------------------------------ introspection

    @property
    def num_active_requests(self) -> int:
        """How many requests have a trie (state not yet released)."""
        return len(self._states)

    @property
    def num_global_tokens(self) -> int:
        """Tokens in the global trie (== the retained history's total length)."""
        return self._global.num_tokens

    @property
    def num_global_sequences(self) -> int:
        """Sequences in the retained global history."""
        return len(self._history)

    def num_global_nodes(self) -> int:
        """Materialised nodes of the global trie (walks it: O(nodes))."""
        return self._global.num_nodes()

    # -------------------------------------------------------------------- state

    def _sync(self, seq: SequenceView) -> _RequestState:
        """The request's state, brought up to date with `seq.token_ids`.

        O(max_depth) per token appended since the last sync; a rebuild from scratch
        for a new request or one whose tokens no longer extend the stored copy.
        """
        tokens = seq.token_ids
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _RequestState(self.max_depth)
        have = state.tokens
        n_have = len(have)
        if n_have and (
            len(tokens) < n_have or tokens[n_have - 1] != have[-1] or tokens[0] != have[0]
        ):
            state = self._states[seq.request_id] = _RequestState(self.max_depth)
            have, n_have = state.tokens, 0
        state.num_prompt_tokens = seq.num_prompt_tokens
        if len(tokens) > n_have:
            have.extend(tokens[n_have:])
            state.windows = state.trie.extend(state.windows, have, n_have)
        return state

    def _add_global(self, tokens: list[int]) -> None:
        """Append one finished sequence to the global history, evicting the oldest
        (and rebuilding the trie) when over `max_global_tokens`."""
        cap = self.max_global_tokens
        if cap == 0 or not tokens:
            return
        if len(tokens) > cap:
            tokens = tokens[-cap:]
        self._history.append(tokens)
        self._history_tokens += len(tokens)
        if self._history_tokens <= cap:
            self._global.extend([], tokens, 0)
            return
        low = int(cap * _GLOBAL_LOW_WATER)
        while len(self._history) > 1 and self._history_tokens > low:
            self._history_tokens -= len(self._history.popleft())
        trie = _Trie(self.max_depth)
        for seq in self._history:
            trie.extend([], seq, 0)
        self._global = trie

    # ------------------------------------------------------------------ drafting

    def _chain(
        self, trie: _Trie, tail: list[int], node: _Node, off: int, depth: int, limit: int
    ) -> tuple[list[int], float]:
        """Greedy most-frequent-child chain of at most `limit` tokens from the cursor
        ``(node, off)`` at `depth` (the match of `tail`'s suffix), re-anchoring when
        the cursor has no continuation (depth limit, end of the stored data).

        Returns ``(tokens, score)``, score = ``sum_i prod_{j <= i} p_j``. O(limit)
        steps, plus an O(max_depth log max_depth) re-match per re-anchor.
        """
        out: list[int] = []
        score, cum = 0.0, 1.0
        min_p = self.min_token_prob
        max_depth = self.max_depth
        while len(out) < limit:
            src = node.src
            if depth < max_depth and src is not None and node.pos + off < len(src):
                # lazy tail: a single occurrence, p = 1
                out.append(src[node.pos + off])
                score += cum
                off += 1
                depth += 1
                continue
            child = node.best if (depth < max_depth and src is None) else None
            if child is None:
                # no continuation here: match (context + chain) again
                # the whole current `depth`-suffix has no continuation: look shorter
                found, f_off, m = trie.longest_match(
                    (tail + out)[-(max_depth - 1) :], max_len=depth - 1
                )
                if found is None or m < self.min_match:
                    break
                node, off, depth = found, f_off, m
                continue
            p = child.count / node.count
            if p < min_p:
                break
            cum *= p
            score += cum
            out.append(child.tok)
            node, off, depth = child, 0, depth + 1
        return out, score

    def _limit(self, k: int, match_len: int) -> int:
        """Adaptive length: ``min(k, ceil(alpha * match_len))``."""
        return min(k, math.ceil(self.alpha * match_len - 1e-9))

    def _propose_one(self, state: _RequestState, k: int) -> tuple[list[int], int]:
        tail = state.tokens[-(self.max_depth - 1) :]
        best: tuple[float, int, int, list[int]] | None = None  # (score, m, prefer, tokens)

        # request trie: the open windows are the context's suffixes seen before
        # (windows[m - 1] = suffix of length m), deepest last
        trie = state.trie
        windows = state.windows
        for m in range(len(windows), self.min_match - 1, -1):
            node = windows[m - 1]
            if trie.has_next(node, 0, m):
                chain, score = self._chain(trie, tail, node, 0, m, self._limit(k, m))
                if chain:
                    best = (score, m, 1, chain)
                break

        # global trie
        if self._global.num_tokens:
            g_node, g_off, m = self._global.longest_match(tail)
            if g_node is not None and m >= self.min_match:
                chain, score = self._chain(
                    self._global, tail, g_node, g_off, m, self._limit(k, m)
                )
                if chain and (best is None or (score, m, 0) > best[:3]):
                    best = (score, m, 0, chain)
        return ([], 0) if best is None else (best[3], best[1])

    # ----------------------------------------------------------------- protocol

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        """One chain per sequence, at most ``min(budgets[i], num_spec_tokens,
        ceil(alpha * match_len))`` long; [] for a zero budget (the sequence is then
        not even synced this step: `observe` / the next `propose` catch up)."""
        check_budgets(seqs, budgets)
        return DraftProposal(token_ids=[self.lookup(seq, int(budget))[0] for seq, budget in zip(seqs, budgets)])

    def lookup(self, seq: SequenceView, k: int) -> tuple[list[int], int]:
        """(a chain of at most `k` tokens, the length of the context suffix it continues):
        the match length is the evidence a hybrid drafter weighs (`specserve.spec.hybrid`)."""
        if k <= 0 or not seq.token_ids:
            return [], 0
        return self._propose_one(self._sync(seq), min(k, self.num_spec_tokens))

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        """Sync each request's trie with its updated tokens (so that `release` sees
        the whole output even if the request is never proposed for again)."""
        for seq in seqs:
            if seq.token_ids:
                self._sync(seq)

    def release(self, request_id: str) -> None:
        """Drop the request's trie; its output (and prompt, if
        `global_include_prompts`) joins the global history. Unknown ids are ignored."""
        state = self._states.pop(request_id, None)
        if state is None:
            return
        start = 0 if self.global_include_prompts else state.num_prompt_tokens
        self._add_global(state.tokens[start:])
