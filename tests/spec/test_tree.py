"""Token-tree speculation: the tree helpers, K/V compaction of the accepted branch, and
tree verification in the batched engine against plain decoding (greedy and seeded
sampling) with an oracle drafter whose trees hold the right branch among decoys."""

from __future__ import annotations

import random

import pytest
import torch

from specserve.api import SpecSetup
from specserve.cache.kv_cache import KVCache
from specserve.equivalence import compare_greedy
from specserve.sampling.params import SamplingParams
from specserve.spec.base import DraftProposal, SequenceView
from specserve.spec.policy import FixedSpecPolicy
from specserve.spec.tree import ancestor_mask, check_tree, depths, path_tokens, walk
from tests.spec.views import run_together

#        root
#       /    \
#     d0=5   d1=7
#     |      /   \
#   d2=9  d3=1   d4=2
#              |
#            d5=3
TOKENS = [5, 7, 9, 1, 2, 3]
PARENTS = [-1, -1, 0, 1, 1, 4]


def test_tree_helpers():
    check_tree(TOKENS, PARENTS)
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    assert path_tokens(TOKENS, PARENTS, 5) == [7, 2, 3]
    mask = ancestor_mask(PARENTS)
    assert mask[6].tolist() == [True, False, True, False, False, True, True]  # d5 sees root, d1, d4, itself
    assert mask[3].tolist() == [True, True, False, True, False, False, False]
    # node targets: root -> 7, d1 -> 2, d4 -> 3, d5 -> 8 (no child: 8 is the bonus)
    targets = [7, 0, 2, 0, 0, 3, 8]
    assert walk(TOKENS, PARENTS, targets) == [1, 4, 5]
    assert walk(TOKENS, PARENTS, [4, 0, 0, 0, 0, 0, 0]) == []  # no child carries 4


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [([1, 2], [-1], "one parent per draft"), ([1, 2], [-1, 1], "earlier draft"), ([1, 1], [-1, -1], "twice")],
)
def test_bad_trees_are_refused(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        DraftProposal([tokens], parents=[parents])


def test_move_compacts_positions_in_every_layer():
    kv = KVCache(2, 1, 64, 1, 2, torch.float32, "cpu", block_size=4, num_blocks=16)
    slot = kv.allocate()
    kv.tables[slot] = [3, 9]  # positions 0-3 in block 3, 4-7 in block 9
    for pool in (*kv.k, *kv.v):
        pool[0, kv.indices(slot, 0, 8)] = torch.arange(8, dtype=torch.float32)[:, None]
    kv.move(slot, [2, 5, 7], [2, 3, 4])
    for pool in (*kv.k, *kv.v):
        assert pool[0, kv.indices(slot, 0, 5), 0].tolist() == [0, 1, 2, 5, 7]


class OracleTreeDrafter:
    """Trees that hold the reference continuation among decoys: at each depth the right
    token and a decoy are siblings (in random order), the decoy has a child of its own
    (so the accepted branch is not a prefix of the drafts), and with probability
    `wrong` a depth carries two decoys (the walk stops there and emits the target's token)."""

    name = "tree-oracle"

    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab: int, wrong: float, seed: int = 0) -> None:
        self.references = references
        self.vocab = vocab
        self.wrong = wrong
        self.rng = random.Random(seed)

    def propose(self, seqs: list[SequenceView], budgets: list[int]) -> DraftProposal:
        tokens_out, parents_out = [], []
        for view, budget in zip(seqs, budgets):
            ref = self.references[tuple(view.token_ids[: view.num_prompt_tokens])]
            done = len(view.token_ids) - view.num_prompt_tokens
            tokens: list[int] = []
            parents: list[int] = []
            parent = -1
            for right in ref[done : done + budget // 3]:
                decoy = (right + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
                good = right if self.rng.random() >= self.wrong else (decoy + 1 + self.rng.randrange(self.vocab - 2)) % self.vocab
                if good == decoy:
                    good = (decoy + 1) % self.vocab
                pair = [good, decoy] if self.rng.random() < 0.5 else [decoy, good]
                first = len(tokens)
                tokens += pair
                parents += [parent, parent]
                tokens.append(self.rng.randrange(self.vocab))  # a child under the decoy
                parents.append(first + pair.index(decoy))
                parent = first + pair.index(good)
            tokens_out.append(tokens)
            parents_out.append(parents)
        return DraftProposal(tokens_out, parents=parents_out)

    def observe(self, seqs, num_accepted) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "List three uses of copper.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia and why was it chosen?",
    "Describe how a bicycle gear works.",
    "Give a short recipe for pancakes.",
]


def _run_with_tree(llm, prompts, params, references, wrong):
    drafter = OracleTreeDrafter(references, llm.config.vocab_size, wrong)
    llm.use_spec(SpecSetup("tree-oracle", 12, drafter, FixedSpecPolicy(12)))
    try:
        return llm.generate(prompts, params)
    finally:
        llm.set_spec(None)


@pytest.mark.parametrize("wrong", [0.0, 0.3])
def test_tree_greedy_equals_plain_fp32(llm_fp32, wrong):
    llm = llm_fp32
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = llm.generate(prompts, params)
    refs = {tuple(p): o.token_ids for p, o in zip(prompts, plain)}
    tree = _run_with_tree(llm, prompts, params, refs, wrong)
    for p, o in zip(plain, tree):
        assert o.token_ids == p.token_ids
        assert o.metrics.accepted_tokens > 0
    if wrong == 0.0:  # every right branch accepted: 4 levels of 12 nodes per forward, + the bonus
        assert all(o.metrics.acceptance_length > 3.0 for o in tree)


def test_tree_greedy_equals_plain_bf16_up_to_near_ties(llm_bf16):
    llm = llm_bf16
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    plain = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2))
    refs = {tuple(p): o.token_ids for p, o in zip(prompts, plain)}
    tree = _run_with_tree(llm, prompts, SamplingParams(max_tokens=40, ignore_eos=True), refs, 0.3)
    for p, o in zip(plain, tree):
        d = compare_greedy(p.token_ids, p.logprobs, o.token_ids, torch.bfloat16)
        assert d.ok, d.describe()


def test_tree_seeded_sampling_equals_plain(llm_exact):
    """Counter-based uniforms: the walk emits, at every output position, the token plain
    sampling draws with that position's uniform, so a seeded request is token-identical."""
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    params = [SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=10 + i, ignore_eos=True) for i in range(4)]
    plain = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    refs = {tuple(p): o.token_ids for p, o in zip(prompts, plain)}
    drafter = OracleTreeDrafter(refs, llm.config.vocab_size, 0.3)
    llm.use_spec(SpecSetup("tree-oracle", 12, drafter, FixedSpecPolicy(12)))
    seqs = run_together(llm, prompts, params)
    for p, s in zip(plain, seqs):
        assert s.output_ids == p.token_ids
        assert s.metrics.accepted_tokens > 0
