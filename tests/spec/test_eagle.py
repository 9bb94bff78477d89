"""EAGLE head: its KV-cached tree drafting agrees with its training-time forward, it is
lossless in the engine (greedy and seeded sampling, alone and batched), the packaged
head loads and accepts drafts, and `specserve train-drafter` trains a working head."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from specserve.engine.runner import ForwardItem
from specserve.equivalence import bit_exact, compare_greedy
from specserve.model.layers import CausalBatch
from specserve.sampling.params import SamplingParams
from specserve.spec.base import SequenceView
from specserve.spec.eagle import DEFAULT_EAGLE, EagleDrafter, EagleHead, load_head, save_head
from tests.spec.views import generate_with, run_together

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "List three uses of copper.",
    "Write a haiku about autumn rain.",
    "Describe how a bicycle gear works.",
    "Give a short recipe for pancakes.",
    "Write a Python function that reverses a list.",
    "Repeat this sentence exactly, twice: the quick brown fox jumps over the lazy dog.",  # copying pays
]


@pytest.fixture(scope="module")
def random_head_dir(llm_fp32, tmp_path_factory):
    """An untrained head (seeded), saved like a trained one."""
    torch.manual_seed(0)
    model = llm_fp32.engine.runner.model
    head = EagleHead(model.config, 2048)
    head.draft_ids.copy_(torch.randperm(model.config.vocab_size)[:2048].sort().values)
    out = tmp_path_factory.mktemp("eagle-random")
    save_head(head, out, {"target": "test"})
    return str(out)


@pytest.fixture(scope="module")
def layered_head_dir(llm_fp32, tmp_path_factory):
    """An untrained head (seeded) that reads two target layers beside the final hidden state,
    with a random (not zero) fuse, so the layers' part changes every draft."""
    torch.manual_seed(1)
    model = llm_fp32.engine.runner.model
    head = EagleHead(model.config, 2048, feature_layers=(2, 15))
    head.draft_ids.copy_(torch.randperm(model.config.vocab_size)[:2048].sort().values)
    with torch.no_grad():
        head.fuse.weight.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("eagle-layered")
    save_head(head, out, {"target": "test"})
    return str(out)


def _features(llm, ids: list[int], feature_layers=()) -> torch.Tensor:
    """The target's final hidden states of every position of `ids` (then those layers' outputs)."""
    from specserve.cache.kv_cache import KVCache
    from specserve.engine.runner import ModelRunner

    model = llm.engine.runner.model
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, len(ids) + 1, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device)
    runner = ModelRunner(model, cache)
    _, hidden = runner.forward([ForwardItem(cache.allocate(), 0, ids, logits_from=None)], all_hidden=True,
                               feature_layers=feature_layers)
    return hidden


@pytest.mark.parametrize("llm_fixture", ["llm_fp32", "llm_bf16"])
def test_feature_layers_are_those_layers_outputs(llm_fixture, request):
    """With feature layers the runner's hidden rows are the final hidden state, then each
    listed layer's output in the order asked: the last layer's output, normed, is the final
    hidden state; a layer the forward skips is an error, not a silent zero."""
    llm = request.getfixturevalue(llm_fixture)
    model = llm.engine.runner.model
    H, last = model.config.hidden_size, model.config.num_layers - 1
    ids = llm.chat_prompt([{"role": "user", "content": PROMPTS[1]}])
    plain = _features(llm, ids)
    wide = _features(llm, ids, (last, 3))
    assert wide.shape == (len(ids), 3 * H)
    assert torch.equal(wide[:, :H], plain)
    norm = model.native.norm if model.native is not None else (lambda x, n: n(x))
    torch.testing.assert_close(norm(wide[:, H : 2 * H], model.norm), plain, rtol=0, atol=0)
    assert not torch.equal(wide[:, 2 * H :], wide[:, H : 2 * H])
    # the layers' outputs come with the features only when a drafter reads every row
    from specserve.cache.kv_cache import KVCache
    from specserve.engine.runner import ModelRunner

    cfg = model.config
    cache = KVCache(cfg.num_layers, 2, len(ids) + 1, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device)
    runner = ModelRunner(model, cache)
    _, picked = runner.forward([ForwardItem(cache.allocate(), 0, ids)], feature_layers=(3,))
    assert picked.shape == (1, H)
    skip = [True] * cfg.num_layers
    skip[3] = False
    with pytest.raises(ValueError, match=r"feature layers \[3\] did not run"):
        runner.forward([ForwardItem(cache.allocate(), 0, ids, logits_from=None)], skip, all_hidden=True,
                       feature_layers=(3,))


@pytest.mark.parametrize("head_fixture", ["random_head_dir", "layered_head_dir"])
def test_tree_drafts_match_the_training_forward(llm_fp32, head_fixture, request):
    """The drafter's cached, tree-masked forwards give the same predictions as the head's
    plain causal forward over the same path (positions, features and masks line up); for a
    head that reads several target layers, the real rows carry them and draft rows do not."""
    llm = llm_fp32
    model = llm.engine.runner.model
    head = load_head(request.getfixturevalue(head_fixture), model)
    drafter = EagleDrafter(head, num_slots=2, max_len=256, top_k=3, depth=3)
    ids = llm.chat_prompt([{"role": "user", "content": PROMPTS[0]}])
    wide = _features(llm, ids, head.feature_layers)
    n = len(ids) - 1  # the last prompt token plays the bonus token: not yet "in the target's cache"
    drafter.take_hidden("r", 0, wide[:n])
    with torch.inference_mode():
        feats = head.fused(wide)  # what the head reads at the real positions
    if head.feature_layers:
        assert not torch.allclose(feats, wide[:, : model.config.hidden_size])
        with pytest.raises(ValueError, match="feature rows of width 576 for a head that reads 1728"):
            drafter.take_hidden("q", 0, wide[:n, : model.config.hidden_size])  # rows without the layers
    view = SequenceView("r", list(ids), n, SamplingParams(), slot=1)
    proposal = drafter.propose([view], [20])
    tokens, parents = proposal.token_ids[0], proposal.parents[0]
    assert len(tokens) == 20 and parents[0] == -1

    def causal(path_tokens, path_feats):
        # inputs i = 0..m-1: (token i + 1, feature i)
        L = path_feats.shape[0]
        out = head(torch.tensor(path_tokens), path_feats, torch.arange(L), CausalBatch(1, L))
        return out

    with torch.inference_mode():
        out = causal(ids[1 : n + 1], feats[:n])  # the catch-up: predicts the root's feature
        root = out[-1]
        top = torch.topk(head.logits(root[None])[0], 3).indices
        expected = sorted(head.draft_ids[top].tolist())
        assert sorted(t for t, p in zip(tokens, parents) if p == -1) == expected
        # the best depth-1 node's children: one more step along the path
        best = tokens[0]
        out2 = causal(ids[1 : n + 1] + [best], torch.cat([feats[:n], root[None]]))
        kids = torch.topk(head.logits(out2[-1:])[0], 3).indices
        got = sorted(t for t, p in zip(tokens, parents) if p == 0)
        assert got and set(got) <= set(head.draft_ids[kids].tolist())
        # and a depth-3 node, two steps along (its parent's predicted feature as input)
        child = next(j for j, p in enumerate(parents) if p == 0)
        grand = [t for t, p in zip(tokens, parents) if p == child]
        if grand:
            out3 = causal(ids[1 : n + 1] + [best, tokens[child]], torch.cat([feats[:n], root[None], out2[-1:]]))
            kids3 = torch.topk(head.logits(out3[-1:])[0], 3).indices
            assert set(grand) <= set(head.draft_ids[kids3].tolist())


def test_catch_up_runs_the_last_window_of_features(llm_fp32, random_head_dir):
    """A catch-up over more rows than the drafter's window runs the last `window` only: its
    tree's roots are those of the head's causal forward over just those rows, at their
    positions; a long backlog handed over in pieces is cut to the window as it arrives."""
    model = llm_fp32.engine.runner.model
    head = load_head(random_head_dir, model)
    ids = llm_fp32.chat_prompt([{"role": "user", "content": PROMPTS[3]}])
    feats = _features(llm_fp32, ids)
    n, window = len(ids) - 1, 6
    assert n > 4 * window + 4
    drafter = EagleDrafter(head, num_slots=2, max_len=256, top_k=3, depth=2, window=window)
    drafter.take_hidden("r", 0, feats[:n])
    view = SequenceView("r", list(ids), n, SamplingParams(), slot=0)
    assert drafter.pending_rows(view) == 0  # the prompt's rows are no backlog
    proposal = drafter.propose([view], [12])  # every root and child fits
    assert proposal.catch_up_rows == window
    with torch.inference_mode():
        out = head(torch.tensor(ids[n - window + 1 : n + 1]), feats[n - window : n], torch.arange(n - window, n),
                   CausalBatch(1, window))
        top = torch.topk(head.logits(out[-1:])[0], 3).indices
    roots = [t for t, p in zip(proposal.token_ids[0], proposal.parents[0]) if p == -1]
    assert sorted(roots) == sorted(head.draft_ids[top].tolist())

    drafter.take_hidden("s", 0, feats[:4])
    drafter.take_hidden("s", 4, feats[4:n])  # past 4 windows: cut at once
    backlog = SequenceView("s", list(ids), 0, SamplingParams(), slot=1)
    assert drafter._state["s"].num_pending == window and drafter.pending_rows(backlog) == window
    assert drafter.propose([backlog], [2]).catch_up_rows == window


def test_pruned_expansion_proposes_the_same_trees_with_fewer_forwards(llm_fp32):
    """Expansion skips nodes whose children the budget cannot take: the trees are exactly
    those of expanding every depth, for small and large budgets, in one batch, with fewer
    head forwards. The packaged head (peaked guesses, so small budgets fill up early)."""
    llm = llm_fp32
    model = llm.engine.runner.model
    head = load_head(DEFAULT_EAGLE, model)
    ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    budgets = [1, 3, 4, 10]
    got = {}
    for prune in (True, False):
        drafter = EagleDrafter(head, num_slots=4, max_len=256)
        drafter.prune = prune
        calls = []
        run = drafter._run
        drafter._run = lambda entries, run=run, calls=calls: calls.append(len(entries)) or run(entries)
        views = []
        for slot, seq in enumerate(ids):
            n = len(seq) - 1
            drafter.take_hidden(f"r{slot}", 0, _features(llm, seq)[:n])
            views.append(SequenceView(f"r{slot}", list(seq), n, SamplingParams(), slot=slot))
        proposal = drafter.propose(views, budgets)
        got[prune] = (proposal.token_ids, proposal.parents, sum(calls))
        for tokens, conf in zip(proposal.token_ids, proposal.confidence):
            # the drafter's confidence per node, best first, running on past the budget
            assert len(conf) > len(tokens) and all(0 < b <= a <= 1 for a, b in itertools.pairwise(conf))
    assert got[True][:2] == got[False][:2]
    assert [len(t) for t in got[True][0]] == budgets
    assert got[True][2] < got[False][2], (got[True][2], got[False][2])


def test_unrolled_training_steps_see_what_drafting_sees(llm_fp32):
    """Training-time test: step s of the unrolled head at row i equals the plain causal
    forward over drafting's path for that row, the real inputs up to the root (row i - s),
    then the drafts, each reading its parent's predicted feature. Two sequences at once,
    a head whose layer attends (random weights), GQA as in the target."""
    from specserve.spec.train import unrolled

    torch.manual_seed(1)
    model = llm_fp32.engine.runner.model
    head = EagleHead(model.config, 512)
    head.draft_ids.copy_(torch.randperm(model.config.vocab_size)[:512].sort().values)
    head = head.float().bind(model)
    with torch.no_grad():
        for p in head.layer.parameters():  # big enough that attention is far from uniform
            p.mul_(4.0) if p.dim() > 1 else None
    B, L, H = 2, 12, model.config.hidden_size
    tok_in = torch.randint(0, model.config.vocab_size, (B, L))
    feats = torch.randn(B, L, H)
    with torch.inference_mode():
        steps = [pred for pred, _ in unrolled(head, tok_in, feats, 4)]

        def causal(toks, fs):
            n = len(toks)
            return head(torch.tensor(toks), torch.stack(fs), torch.arange(n), CausalBatch(1, n))

        for b in range(B):
            for s in range(4):
                for i in range(s, L):
                    root = i - s
                    toks = tok_in[b, : i + 1].tolist()
                    fs = [feats[b, j] for j in range(root + 1)]  # the real inputs, up to the root
                    for r in range(1, s + 1):  # the draft at depth r + 1 reads step r - 1's guess
                        fs.append(steps[r - 1][b, root + r - 1])
                    want = causal(toks, fs)[-1]
                    torch.testing.assert_close(steps[s][b, i], want, rtol=1e-4, atol=1e-4)


def _eagle_outputs(llm, head_dir, prompts, params, k=10):
    return generate_with(llm, f"eagle:{head_dir}", prompts, params, k)


@pytest.mark.parametrize("spec", ["eagle:{random}", "eagle:{layered}", "ngram+eagle:{layered}"])
def test_untrained_head_is_still_lossless(llm_exact, random_head_dir, layered_head_dir, spec):
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = llm.generate(prompts, params)
    out = generate_with(llm, spec.format(random=random_head_dir, layered=layered_head_dir), prompts, params, 10)
    for p, o in zip(plain, out):
        assert o.token_ids == p.token_ids
        assert o.metrics.drafted_tokens > 0


needs_head = pytest.mark.skipif(not (DEFAULT_EAGLE / "head.safetensors").is_file(), reason="no packaged head")


@needs_head
# the head alone on the PyTorch compute path (fp32) and, after copying (spec/hybrid.py), on the
# served one (bf16 on the native layers where the CPU has them)
@pytest.mark.parametrize(("spec", "llm_fixture"), [("eagle", "llm_fp32"), ("ngram+eagle", "llm_exact")])
def test_packaged_head_greedy_equals_plain_batched(spec, llm_fixture, request):
    llm = request.getfixturevalue(llm_fixture)
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=64)
    plain = llm.generate(prompts, params)
    llm.set_spec(spec, 10, False)
    drafter = llm.engine.drafter
    try:
        out = llm.generate(prompts, params)  # all seven in one batch
    finally:
        llm.set_spec(None)
    for p, o in zip(plain, out):
        assert o.token_ids == p.token_ids
    accepted = sum(o.metrics.accepted_tokens for o in out)
    forwards = sum(o.metrics.forward_passes for o in out)
    assert (accepted + forwards) / forwards > 1.2  # the trained head drafts tokens the target accepts
    if "+" in spec:  # both the copied chains and the head's trees were proposed
        assert drafter.copied_steps > 0 and drafter.model_steps > 0


@needs_head
def test_packaged_head_bf16_equals_plain_up_to_near_ties(llm_bf16):
    llm = llm_bf16
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    plain = [llm.generate([p], SamplingParams(max_tokens=64, logprobs=2))[0] for p in prompts]
    llm.set_spec("eagle", 10, True)
    try:
        out = llm.generate(prompts, SamplingParams(max_tokens=64))
    finally:
        llm.set_spec(None)
    for p, o in zip(plain, out):
        d = compare_greedy(p.token_ids, p.logprobs, o.token_ids, torch.bfloat16)
        assert d.identical if bit_exact(llm_bf16) else d.ok, d.describe()


@needs_head
@pytest.mark.parametrize("spec", ["eagle", "ngram+eagle"])
def test_packaged_head_seeded_sampling_equals_plain(llm_exact, spec):
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:3] + PROMPTS[-1:]]
    params = [SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=7 + i) for i in range(4)]
    plain = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    llm.set_spec(f"{spec}:{DEFAULT_EAGLE}", 10, False)
    drafter = llm.engine.drafter
    seqs = run_together(llm, prompts, params)
    for p, s in zip(plain, seqs):
        assert s.output_ids == p.token_ids
    if "+" in spec:  # both the copied chains and the head's trees were proposed
        assert drafter.copied_steps > 0 and drafter.model_steps > 0


def test_target_features_of_a_batch_are_those_of_each_sample_alone(llm_bf16):
    """The training data's features come from forwards over several samples at once; each
    sample's rows are exactly those of a forward over it alone (the row-invariant native
    layers; close on the PyTorch path)."""
    from specserve.equivalence import bit_exact
    from specserve.spec.train import target_features

    model = llm_bf16.engine.runner.model
    samples = [llm_bf16.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
    samples[1] = samples[1] + samples[0][5:40]  # different lengths
    together = target_features(model, samples)
    in_pairs = target_features(model, samples, max_tokens=len(samples[0]) + len(samples[1]))
    alone = [target_features(model, [s])[0] for s in samples]
    for t, p, a, s in zip(together, in_pairs, alone, samples):
        assert t.shape == (len(s), model.config.hidden_size) and t.dtype == torch.bfloat16
        if bit_exact(llm_bf16):
            assert torch.equal(t, a) and torch.equal(p, a)
        else:
            torch.testing.assert_close(t.float(), a.float(), atol=0.1, rtol=0.05)


def test_train_drafter_end_to_end(llm_exact, tmp_path):
    """A tiny run of the training pipeline: data, a checkpoint, a head that loads and is lossless;
    a second run resumes from the cached data and checkpoint."""
    from specserve.spec.train import TrainConfig, train_eagle

    cfg = TrainConfig(prompts=8, max_tokens=24, epochs=1, batch_size=4, draft_vocab=1024, batch_generate=8)
    lines: list[str] = []
    out = train_eagle(llm_exact, tmp_path / "head", cfg, log=lines.append)
    assert (out / "head.safetensors").is_file() and (out / "data.pt").is_file() and (out / "checkpoint.pt").is_file()
    assert any(line.startswith("epoch 1:") for line in lines)
    lines.clear()
    train_eagle(llm_exact, out, cfg, log=lines.append)
    assert any("reused" in line for line in lines) and not any(line.startswith("epoch") for line in lines)
    llm = llm_exact
    prompts = [llm.chat_prompt([{"role": "user", "content": PROMPTS[1]}])]
    params = SamplingParams(max_tokens=24)
    assert _eagle_outputs(llm, out, prompts, params)[0].token_ids == llm.generate(prompts, params)[0].token_ids
    # asking for self-instruct prompts extends the cached data and retrains on all of it
    before = torch.load(out / "data.pt", weights_only=False)
    lines.clear()
    train_eagle(llm_exact, out, replace(cfg, self_instruct=4), log=lines.append)
    after = torch.load(out / "data.pt", weights_only=False)
    assert after["self_instruct"] == 4 and after["num_prompts"] == before["num_prompts"] + 4
    assert len(after["tokens"]) == len(after["feats"]) == len(after["response_start"]) == after["num_prompts"]
    assert all(torch.equal(a, b) for a, b in zip(before["tokens"], after["tokens"]))
    for ids, feats, start in list(zip(after["tokens"], after["feats"], after["response_start"]))[-4:]:
        assert feats.shape == (len(ids), before["feats"][0].shape[1]) and 0 < start < len(ids)
    assert len(after["self_instruct_prompts"]) == 4
    assert any("checkpoint" in line and "removed" in line for line in lines)
    assert any(line.startswith("epoch 1:") for line in lines)
    config = json.loads((out / "config.json").read_text())
    assert "4 requests written by the target itself" in config["training"]["data"]
    # asking again for as many (or fewer) leaves the data and the checkpoint alone
    lines.clear()
    train_eagle(llm_exact, out, replace(cfg, self_instruct=2), log=lines.append)
    assert torch.load(out / "data.pt", weights_only=False)["num_prompts"] == after["num_prompts"]
    assert not any("removed" in line or line.startswith("epoch") for line in lines)
    # a checkpoint trained with other unrolled steps is not resumed into a mixed objective
    with pytest.raises(ValueError, match="trained with unroll 3, this run trains with unroll 2"):
        train_eagle(llm_exact, out, replace(cfg, self_instruct=2, unroll=2), log=lines.append)
    # a head that reads two more target layers, started from the first one: the cached data's
    # features are recomputed with the layers' outputs, and the new head starts as the old one
    layered = tmp_path / "layered"
    layered.mkdir()
    (layered / "data.pt").write_bytes((out / "data.pt").read_bytes())
    lines.clear()
    grown = replace(cfg, self_instruct=4, feature_layers=(2, 15), init=str(out), epochs=1)
    with torch.no_grad():
        old = load_head(out, llm.engine.runner.model)
    train_eagle(llm_exact, layered, grown, log=lines.append)
    assert any("features recomputed with layers [2, 15]" in line for line in lines)
    data = torch.load(layered / "data.pt", weights_only=False)
    H = llm.engine.runner.model.config.hidden_size
    assert data["feature_layers"] == [2, 15] and data["feats"][0].shape[1] == 3 * H
    assert all(torch.equal(a[:, :H], b) for a, b in zip(data["feats"], after["feats"]))
    # the layers' part comes from forwards that stop at layer 15: it is a whole forward's
    whole = _features(llm, data["tokens"][0].tolist(), (2, 15))[:, H:]
    torch.testing.assert_close(data["feats"][0][:, H:].float(), whole.float(), atol=0.05, rtol=0.02)
    new = load_head(layered, llm.engine.runner.model)
    assert new.feature_layers == (2, 15) and torch.equal(new.draft_ids, old.draft_ids)
    assert json.loads((layered / "config.json").read_text())["feature_layers"] == [2, 15]
    assert _eagle_outputs(llm, layered, prompts, params)[0].token_ids == llm.generate(prompts, params)[0].token_ids
    with pytest.raises(ValueError, match="trained with feature_layers"):
        train_eagle(llm_exact, layered, replace(grown, feature_layers=(3,)), log=lines.append)


def test_self_instruct_requests_are_filtered():
    """Only a usable request survives: one line, a sentence of a few words, no example, no link."""
    from specserve.spec.train import SELF_INSTRUCT_POOLS, _self_instruct_request

    examples = {q.lower() for pool in SELF_INSTRUCT_POOLS.values() for q in pool}
    example = next(iter(SELF_INSTRUCT_POOLS.values()))[0]
    assert _self_instruct_request(" How do volcanoes form?\n6. Next item", examples) == "How do volcanoes form?"
    assert _self_instruct_request(' "Write a poem about a quiet harbor."', examples) == "Write a poem about a quiet harbor."
    for bad in ("Hi.", "Too few words?", "1234 is a number I like.", "See https://example.org for this one.",
                "A request that never ends and has no final punctuation at all", "x " * 300 + ".", " " + example):
        assert _self_instruct_request(bad, examples) is None, bad


def test_self_instruct_prompts_are_distinct_and_seeded(llm_exact):
    from specserve.spec.train import self_instruct_prompts

    first = self_instruct_prompts(llm_exact, 6, seed=3, batch=8)
    assert len(first) == 6 and len({p.lower() for p in first}) == 6
    assert self_instruct_prompts(llm_exact, 6, seed=3, batch=8) == first


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specserve.cli", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train-drafter"], "--out"),
        (["train-drafter", "--out", "x", "--kind", "hydra"], "--kind"),
        (["train-drafter", "--out", "x", "--kind", "medusa", "--medusa-heads", "0"], "--medusa-heads"),
        (["train-drafter", "--out", "x", "--medusa-layers", "2"], "--medusa-layers only applies to --kind medusa"),
        (["generate", "--spec", "medusa:/nonexistent", "hi"], "medusa head directory does not exist"),
        (["train-drafter", "--out", "x", "--lr", "0"], "--lr must be > 0"),
        (["train-drafter", "--out", "x", "--target", "/nonexistent"], "--target: path does not exist"),
        (["train-drafter", "--out", "x", "--epochs", "0"], "--epochs"),
        (["train-drafter", "--out", "x", "--seed", "-1"], "--seed"),
        (["train-drafter", "--out", "x", "--self-instruct", "-5"], "--self-instruct"),
        (["train-drafter", "--out", "x", "--unroll", "0"], "--unroll"),
        (["train-drafter", "--out", "x", "--kind", "medusa", "--unroll", "2"], "--unroll only applies to --kind eagle"),
        (["train-drafter", "--out", "x", "--kind", "medusa", "--feature-layers", "2"],
         "--feature-layers only applies to --kind eagle"),
        (["train-drafter", "--out", "x", "--feature-layers", "2,x"], "--feature-layers: expected comma-separated"),
        (["train-drafter", "--out", "x", "--feature-layers", "2,2"], "--feature-layers: expected distinct"),
        (["train-drafter", "--out", "x", "--feature-layers", "99"], "--feature-layers: the target has layers 0..29"),
        (["train-drafter", "--out", "x", "--init", "/nonexistent"], "--init: not a head directory"),
        (["generate", "--spec", "eagle:/nonexistent", "hi"], "eagle head directory does not exist"),
    ],
)
def test_cli_errors(args, message):
    res = _cli(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_head_for_another_model_is_refused(llm_fp32, tmp_path):
    from dataclasses import replace

    model = llm_fp32.engine.runner.model
    head = EagleHead(replace(model.config, vocab_size=1000), 64)
    save_head(head, tmp_path, {"target": "other"})
    with pytest.raises(ValueError, match="vocab_size 1000"):
        load_head(tmp_path, model)
