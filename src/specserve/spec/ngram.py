"""Prompt-lookup (n-gram) drafting: copy what followed the last time the context's
suffix appeared in the same sequence.

Model-free: no forward pass, no draft distribution (q is one-hot at the proposed
token, so `DraftProposal.probs` entries are None).

Per request the drafter keeps an incremental index ``n-gram tuple -> most recent start
position`` over the sequence's own tokens (prompt + output). Only n-grams that already
have a following token are indexed, so a lookup of the sequence's current suffix can
never return the suffix itself: it returns the most recent *earlier* occurrence, whose
continuation is what gets proposed.

Complexity, with ``W = max_ngram - min_ngram + 1`` window sizes:

* index update: O(W * max_ngram) per appended token (tuple building + dict store);
  a call only indexes the tokens appended since the previous call;
* lookup: at most W dict probes of tuples of length <= max_ngram, plus O(k) to copy
  the k proposed tokens — independent of the context length;
* memory: O(W * L) dict entries for an L-token sequence.
"""

from __future__ import annotations

from typing import Sequence as Seq

from specserve.spec.base import DraftProposal, SequenceView, check_budgets
from specserve.validation import require_int

__all__ = ["NgramDrafter"]


class _NgramState:
    """Per-request index.

    `index` maps every n-gram (min_ngram <= n <= max_ngram) of `tokens[: num_tokens]`
    that is followed by at least one token, i.e. occupying ``[s, s + n)`` with
    ``s + n <= num_tokens - 1``, to its most recent start ``s``. `first`/`last` are
    `tokens[0]` / `tokens[num_tokens - 1]`, a cheap check that the sequence we see
    now still extends the one that was indexed.
    """

    __slots__ = ("index", "num_tokens", "first", "last")

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.num_tokens = 0
        self.first = -1
        self.last = -1


class NgramDrafter:
    """Prompt-lookup drafter (``name = "ngram"``).

    For each sequence, find the longest suffix of ``n`` tokens (``n`` from
    `max_ngram` down to `min_ngram`) that occurred earlier in the sequence, take its
    most recent earlier occurrence and propose the tokens that followed it, up to
    ``min(budget, num_spec_tokens)`` of them.

    When the copied continuation runs into the end of the sequence (the match is
    close to the suffix, e.g. a loop ``a b a b``), it keeps copying from the tokens
    proposed so far, i.e. it extrapolates the period: ``a b a b`` -> ``a b a b ...``.

    Args:
        max_ngram: longest suffix to look up (>= min_ngram).
        min_ngram: shortest suffix to look up (>= 1).
        num_spec_tokens: cap on the tokens proposed per sequence and step (>= 1).
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, num_spec_tokens: int = 8) -> None:
        self.min_ngram = require_int("min_ngram", min_ngram, 1)
        self.max_ngram = require_int("max_ngram", max_ngram, 1)
        if self.max_ngram < self.min_ngram:
            raise ValueError(
                f"max_ngram must be >= min_ngram ({self.min_ngram}), got {max_ngram!r}"
            )
        self.num_spec_tokens = require_int("num_spec_tokens", num_spec_tokens, 1)
        self._states: dict[str, _NgramState] = {}

    # ------------------------------------------------------------------ state

    @property
    def num_active_requests(self) -> int:
        """How many requests have an index (state not yet released)."""
        return len(self._states)

    def _sync(self, request_id: str, tokens: list[int]) -> _NgramState:
        """The request's index, brought up to date with `tokens` (incrementally).

        Cost: O(W * max_ngram) per token appended since the last sync; a full rebuild
        (O(W * max_ngram * L)) only for a new request or one whose tokens no longer
        extend what was indexed (shorter list, or a changed first/last token).
        """
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _NgramState()
        n_tok = len(tokens)
        prev = state.num_tokens
        if prev and (n_tok < prev or tokens[prev - 1] != state.last or tokens[0] != state.first):
            state.index.clear()  # not an extension of what we indexed: rebuild
            state.num_tokens = prev = 0
        if n_tok == prev:
            return state
        index = state.index
        lo, hi = self.min_ngram, self.max_ngram
        # An n-gram ending (exclusively) at `end` is indexed once tokens[end] exists,
        # i.e. for end <= n_tok - 1. Those with end <= prev - 1 are already there.
        for end in range(max(prev, 1), n_tok):
            for n in range(lo, min(hi, end) + 1):
                start = end - n
                index[tuple(tokens[start:end])] = start  # later starts overwrite: most recent
        state.num_tokens = n_tok
        state.first = tokens[0]
        state.last = tokens[-1]
        return state

    # ---------------------------------------------------------------- protocol

    def _propose_one(self, state: _NgramState, tokens: list[int], k: int) -> tuple[list[int], int]:
        """(up to `k` tokens continuing the most recent earlier occurrence of the
        longest matching suffix, that suffix's length); ([], 0) when no suffix of
        >= min_ngram tokens recurs."""
        n_tok = len(tokens)
        index = state.index
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            start = index.get(tuple(tokens[n_tok - n :]))
            if start is None:
                continue
            src = start + n  # first continuation token; src <= n_tok - 1 by construction
            out: list[int] = []
            for i in range(k):
                j = src + i
                out.append(tokens[j] if j < n_tok else out[j - n_tok])
            return out, n
        return [], 0

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        """One draft chain per sequence, each at most ``min(budgets[i], num_spec_tokens)``
        long (0 for a zero budget: such a sequence is not even indexed this step)."""
        check_budgets(seqs, budgets)
        return DraftProposal(token_ids=[self.lookup(seq, int(budget))[0] for seq, budget in zip(seqs, budgets)])

    def lookup(self, seq: SequenceView, k: int) -> tuple[list[int], int]:
        """(a chain of at most `k` tokens, the length of the context suffix it continues):
        the match length is the evidence a hybrid drafter weighs (`specserve.spec.hybrid`)."""
        if k <= 0 or not seq.token_ids:
            return [], 0
        state = self._sync(seq.request_id, seq.token_ids)
        return self._propose_one(state, seq.token_ids, min(k, self.num_spec_tokens))

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        """No-op: the index catches up lazily on the next `propose`."""
        return None

    def release(self, request_id: str) -> None:
        """Drop the request's index (unknown ids are ignored)."""
        self._states.pop(request_id, None)
