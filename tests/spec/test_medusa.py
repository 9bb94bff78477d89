"""Medusa heads: the best-first tree is the true top of the candidate tree, the drafter
reads the head the way training does, it is lossless in the engine (greedy fp32 and bf16,
seeded sampling, alone and batched), and `specserve train-drafter --kind medusa` trains
heads that load and are lossless."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from specserve.equivalence import bit_exact, compare_greedy
from specserve.sampling.params import SamplingParams
from specserve.spec.base import SequenceView
from specserve.spec.medusa import DEFAULT_MEDUSA, MedusaDrafter, MedusaHead, best_first_tree, load_head, save_head
from specserve.spec.tree import check_tree
from tests.spec.test_eagle import PROMPTS, _features
from tests.spec.views import generate_with, run_together

REPEAT = "Repeat after me ten times: go go go go go"


def _save(llm, out, scale: float, num_heads: int = 3) -> str:
    """Medusa heads with seeded random blocks of the given scale (0: each head guesses the
    target's own next token, so a repetitive text is drafted right)."""
    torch.manual_seed(0)
    model = llm.engine.runner.model
    must = set(llm.encode("go go go, go\n")) | set(llm.engine.eos_ids)  # the repetitive answer's tokens
    ids = sorted(must | set(torch.randperm(model.config.vocab_size)[: 4096 - len(must)].tolist()))
    head = MedusaHead(model.config, num_heads, len(ids))
    head.draft_ids.copy_(torch.tensor(ids))
    with torch.no_grad():
        head.weight.normal_(0, scale)
    save_head(head, out, {"target": "test"})
    return str(out)


@pytest.fixture(scope="module")
def random_heads(llm_fp32, tmp_path_factory):
    return _save(llm_fp32, tmp_path_factory.mktemp("medusa-random"), 0.02)


@pytest.fixture(scope="module")
def echo_heads(llm_fp32, tmp_path_factory):
    return _save(llm_fp32, tmp_path_factory.mktemp("medusa-echo"), 0.0)


def _all_nodes(scores, tokens):
    """Brute force: every path of the candidate tree with its summed score."""
    out = []
    for depth in range(1, len(scores) + 1):
        for path in itertools.product(*(range(len(scores[d])) for d in range(depth))):
            out.append((sum(scores[d][j] for d, j in enumerate(path)), path))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_best_first_tree_is_the_top_of_the_candidate_tree(seed):
    rng = random.Random(seed)
    depth, width = rng.randint(1, 4), rng.randint(1, 5)
    scores = [sorted((math.log(rng.random()) for _ in range(width)), reverse=True) for _ in range(depth)]
    tokens = [[100 * d + j for j in range(width)] for d in range(depth)]
    everything = sorted(_all_nodes(scores, tokens), key=lambda x: -x[0])
    for budget in (1, 3, 7, 40):
        toks, parents = best_first_tree(scores, tokens, budget)
        check_tree(toks, parents)
        assert len(toks) == min(budget, len(everything))
        # rebuild each node's path and score from the parents
        paths: list[tuple[int, ...]] = []
        for t, p in zip(toks, parents):
            prefix = paths[p] if p >= 0 else ()
            paths.append((*prefix, t % 100))
        got = sorted(sum(scores[d][j] for d, j in enumerate(path)) for path in paths)
        want = sorted(score for score, _ in everything[: len(toks)])
        assert got == pytest.approx(want)
        assert len(set(paths)) == len(paths)


def test_drafts_are_the_heads_top_candidates(llm_fp32, random_heads):
    llm = llm_fp32
    model = llm.engine.runner.model
    head = load_head(random_heads, model)
    drafter = MedusaDrafter(head, top_k=3)
    ids = llm.chat_prompt([{"role": "user", "content": PROMPTS[0]}])
    feats = _features(llm, ids)
    n = len(ids) - 1  # the last prompt token plays the step's root: not yet in the target's cache
    view = SequenceView("r", list(ids), n, SamplingParams(), slot=0)
    assert drafter.propose([view], [5]).token_ids == [[]]  # no features yet: nothing to draft from
    drafter.take_hidden("r", 0, feats[:n])
    proposal = drafter.propose([view], [9])
    tokens, parents = proposal.token_ids[0], proposal.parents[0]
    assert len(tokens) == 9
    with torch.inference_mode():
        logits = head.logits(head(feats[n - 1 : n]))[:, 0]  # [K, Vd]: head k on the last cached feature
    top = [head.draft_ids[torch.topk(row, 3).indices].tolist() for row in logits]
    assert parents[0] == -1 and tokens[0] == top[0][0]  # the best node: head 1's best guess
    for t, p in zip(tokens, parents):  # a node at depth d is one of head d's candidates
        depth, q = 0, p
        while q >= 0:
            depth, q = depth + 1, parents[q]
        assert t in top[depth]
    # a view whose last cached token is not the one of the stored feature gets no drafts
    stale = SequenceView("r", [*ids, 5], n, SamplingParams(), slot=0)
    assert drafter.propose([stale], [5]).token_ids == [[]]


def _medusa(llm, head_dir, prompts, params, k=10):
    return generate_with(llm, f"medusa:{head_dir}", prompts, params, k)


def test_random_heads_are_lossless_batched(llm_exact, random_heads):
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    plain = llm.generate(prompts, params)
    out = _medusa(llm, random_heads, prompts, params)
    for p, o in zip(plain, out):
        assert o.token_ids == p.token_ids
        assert o.metrics.drafted_tokens > 0


def test_accepted_tree_branches_are_lossless(llm_exact, echo_heads):
    """Heads that guess the target's own next token draft a repetitive answer right: the
    accepted branches' K/V are compacted into place and the output stays plain's."""
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in (REPEAT, PROMPTS[1])]
    params = SamplingParams(max_tokens=48)
    plain = llm.generate(prompts, params)
    out = _medusa(llm, echo_heads, prompts, params)
    for p, o in zip(plain, out):
        assert o.token_ids == p.token_ids
    assert out[0].metrics.accepted_tokens >= 10
    assert out[0].metrics.forward_passes < len(out[0].token_ids) * 0.7


def test_bf16_equals_plain_up_to_near_ties(llm_bf16, echo_heads):
    llm = llm_bf16
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in (REPEAT, *PROMPTS[:3])]
    plain = [llm.generate([p], SamplingParams(max_tokens=48, logprobs=2))[0] for p in prompts]
    out = generate_with(llm, f"medusa:{echo_heads}", prompts, SamplingParams(max_tokens=48), adaptive=True)
    # the repetitive prompt alone, where a drafted row costs least: four sequences at once
    # may make the load-aware plan draft nothing on a CPU where rows are dear
    alone = generate_with(llm, f"medusa:{echo_heads}", prompts[:1], SamplingParams(max_tokens=48), adaptive=True)
    for p, o in zip(plain + plain[:1], out + alone):
        d = compare_greedy(p.token_ids, p.logprobs, o.token_ids, torch.bfloat16)
        assert d.identical if bit_exact(llm_bf16) else d.ok, d.describe()
    assert alone[0].metrics.accepted_tokens > 0


def test_seeded_sampling_equals_plain(llm_exact, echo_heads):
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in (REPEAT, *PROMPTS[:3])]
    params = [SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=11 + i) for i in range(4)]
    plain = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    llm.set_spec(f"medusa:{echo_heads}", 10, False)
    seqs = run_together(llm, prompts, params)
    for p, s in zip(plain, seqs):
        assert s.output_ids == p.token_ids


@pytest.mark.skipif(not (DEFAULT_MEDUSA / "head.safetensors").is_file(), reason="no packaged heads")
def test_packaged_heads_greedy_equal_plain_batched(llm_exact):
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=64)
    plain = llm.generate(prompts, params)
    out = generate_with(llm, "medusa", prompts, params)  # all six in one batch
    for p, o in zip(plain, out):
        assert o.token_ids == p.token_ids
    accepted = sum(o.metrics.accepted_tokens for o in out)
    forwards = sum(o.metrics.forward_passes for o in out)
    assert (accepted + forwards) / forwards > 1.15  # the trained heads draft tokens the target accepts


def test_train_medusa_end_to_end(llm_exact, tmp_path):
    """A tiny run: data, a checkpoint, heads that load and are lossless; a second run
    resumes; an EAGLE checkpoint in the directory is refused with a clear error."""
    from specserve.spec.train import TrainConfig, train_drafter

    cfg = TrainConfig(prompts=8, max_tokens=24, epochs=1, batch_size=4, draft_vocab=1024, batch_generate=8,
                      kind="medusa", medusa_heads=3)
    lines: list[str] = []
    out = train_drafter(llm_exact, tmp_path / "heads", cfg, log=lines.append)
    assert (out / "head.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert any(line.startswith("epoch 1:") and "top-1 per head" in line for line in lines)
    lines.clear()
    train_drafter(llm_exact, out, cfg, log=lines.append)
    assert any("reused" in line for line in lines) and not any(line.startswith("epoch") for line in lines)
    head = load_head(out, llm_exact.engine.runner.model)
    assert head.num_heads == 3 and head.info["training"]["epochs"] == 1
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": PROMPTS[1]}])]
    params = SamplingParams(max_tokens=24)
    assert _medusa(llm, out, prompts, params)[0].token_ids == llm.generate(prompts, params)[0].token_ids
    with pytest.raises(ValueError, match="not a checkpoint of this eagle head"):
        train_drafter(llm_exact, out, TrainConfig(prompts=8, max_tokens=24, epochs=2, draft_vocab=1024), log=lines.append)


def test_heads_of_another_kind_are_refused(llm_fp32, random_heads):
    from specserve.spec.eagle import load_head as load_eagle

    with pytest.raises(ValueError, match="kind 'medusa', not 'eagle'"):
        load_eagle(random_heads, llm_fp32.engine.runner.model)
    with pytest.raises(ValueError, match="not a draft head directory"):
        llm_fp32.set_spec(f"medusa:{random_heads}/..")
