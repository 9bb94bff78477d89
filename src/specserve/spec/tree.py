"""Token trees: proposals with branches, verified in one target forward (SpecInfer, EAGLE-2).

A tree proposal of one sequence is a list of draft tokens with their parents:
`parents[j]` is -1 when draft j follows the root (the sequence's last token, which the
forward feeds first) and otherwise the index of an earlier draft. The forward feeds
`[root, d_0, ..., d_{k-1}]` in this order, each at position `cache_start + depth`, and
each attends to the cached prefix and to its own ancestors only. A chain is the tree
whose parents are `-1, 0, 1, ...`.

Verification walks the tree from the root: at each node the target's own next token
(argmax when greedy; drawn with the uniform of that output position when sampling) is
looked up among the node's children; while a child carries it, the walk descends, and
the first token no child carries is emitted. For drafts without a draft distribution
(deterministic drafters, trained heads expanding top-k), every emitted token is exactly
the token plain decoding would produce with the same uniforms, so the walk is lossless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ROOT = -1


def check_tree(tokens: Sequence[int], parents: Sequence[int]) -> None:
    """Raise ValueError unless `parents` describe a tree over `tokens` (parents first,
    siblings carrying distinct tokens)."""
    if len(tokens) != len(parents):
        raise ValueError(f"a tree needs one parent per draft token: {len(tokens)} tokens, {len(parents)} parents")
    seen: set[tuple[int, int]] = set()
    for j, (tok, parent) in enumerate(zip(tokens, parents)):
        if not ROOT <= parent < j:
            raise ValueError(f"draft {j}: parent {parent} must be -1 (the root) or an earlier draft")
        if (parent, tok) in seen:
            raise ValueError(f"draft {j}: token {tok} appears twice under the same parent")
        seen.add((parent, tok))


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every draft (children of the root are at depth 1)."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent == ROOT else out[parent] + 1)
    return out


def draft_levels(tokens: Sequence[int], parents: Sequence[int] | None) -> int:
    """Draft positions a proposal covers: its length for a chain, its depth for a tree."""
    return len(tokens) if parents is None else max(depths(parents), default=0)


def ancestor_mask(parents: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """`[k + 1, k + 1]` bool: row n sees column m when m is n or an ancestor of n (node 0 is
    the root, node j + 1 is draft j)."""
    k = len(parents)
    mask = torch.eye(k + 1, dtype=torch.bool)
    mask[1:, 0] = True
    for j, parent in enumerate(parents):
        if parent != ROOT:
            mask[j + 1] |= mask[parent + 1]
    return mask.to(device)


def path_tokens(tokens: Sequence[int], parents: Sequence[int], j: int) -> list[int]:
    """The draft tokens from the root down to draft j, inclusive."""
    path: list[int] = []
    while j != ROOT:
        path.append(tokens[j])
        j = parents[j]
    return path[::-1]


def walk(tokens: Sequence[int], parents: Sequence[int], node_targets: Sequence[int]) -> list[int]:
    """Drafts accepted by the walk, root to leaf. `node_targets[n]` is the target's token
    after node n (n = 0 the root, n = j + 1 draft j)."""
    children: dict[int, dict[int, int]] = {}
    for j, (tok, parent) in enumerate(zip(tokens, parents)):
        children.setdefault(parent, {})[tok] = j
    path: list[int] = []
    node = ROOT
    while True:
        nxt = children.get(node, {}).get(node_targets[node + 1])
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt
