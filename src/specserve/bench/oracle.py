"""Oracle drafting: a drafter's proposals cut to the drafts verification will accept.

`specserve bench throughput --methods oracle:SPEC[@B]` runs the drafter SPEC asked for B
drafts (tree nodes for a tree drafter) for every sequence at every step, then hands the
engine only the drafts on the path the request's greedy output takes (known from the
`off` run of the same prompt). The drafter runs and is paid in full; the target verifies
right drafts only, so no verification row is wasted and every draft that could have been
accepted is. The result bounds what a draft-length policy can get from that drafter at
that budget on this machine: a policy can only verify fewer of the same drafts, and beats
the bound by no more than the drafting time a smaller budget saves. It is a measuring
instrument, not a method: it needs the output in advance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from specserve.spec.base import DraftProposal, SequenceView


def accepted_path(tokens: Sequence[int], parents: Sequence[int] | None, truth: Sequence[int]) -> list[int]:
    """Indices of the drafts greedy verification keeps: from the root, the child carrying
    the true next token, while one does (a chain's parents are -1, 0, 1, ...)."""
    parents = list(range(-1, len(tokens) - 1)) if parents is None else parents
    path: list[int] = []
    node = -1
    for want in truth:
        nxt = next((j for j, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == want), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


class OracleDrafter:
    """Wraps a drafter; `truth(request_id)` is that request's whole greedy output."""

    def __init__(self, inner, truth: Callable[[str], Sequence[int]]) -> None:
        self.inner, self.truth = inner, truth
        self.name = f"oracle:{inner.name}"

    def __getattr__(self, name: str):  # take_hidden, pending_rows, wants_hidden, observe, release
        return getattr(self.inner, name)

    def propose(self, seqs: Sequence[SequenceView], budgets: Sequence[int]) -> DraftProposal:
        out = self.inner.propose(seqs, budgets)
        tokens, probs = [], []
        for view, toks, parents, q in zip(seqs, out.token_ids, out.parents, out.probs):
            done = len(view.token_ids) - view.num_prompt_tokens
            path = accepted_path(toks, parents, self.truth(view.request_id)[done:])
            tokens.append([toks[j] for j in path])
            probs.append(q[path] if q is not None else None)  # a chain's path is a prefix of it
        # the path is a chain; confidences are left out (they describe the uncut proposal)
        return DraftProposal(tokens, probs, catch_up_seconds=out.catch_up_seconds, catch_up_rows=out.catch_up_rows)
