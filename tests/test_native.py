"""Native bf16 decoder layers (specserve.model.native): as accurate as the PyTorch path,
and row-invariant: a token's hidden state is bit-identical whatever else shares its
forward (chunking, drafts, token trees, other sequences, scattered block tables).

Every test runs with each library this CPU can run (AMX, and AVX2 on any x86-64 CPU with
AVX2 and FMA) and is skipped where none can (no g++); `specserve info` says which one
models use.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from specserve.cache import KVCache
from specserve.model import layers, native
from specserve.model.layers import build_attention_metadata
from specserve.model.loader import build_model, read_checkpoint

transformers = pytest.importorskip("transformers")

KINDS = [kind for kind, _, _ in native.KINDS if native.load(kind) is not None]


@pytest.fixture(params=KINDS or [pytest.param(None, marks=pytest.mark.skip(reason="no native library runs here"))])
def native_lib(request, monkeypatch):
    """Each native library this CPU runs, as the one models load."""
    lib = native.load(request.param)
    monkeypatch.setattr(native, "library", lambda: lib)
    return lib

VOCAB = 256
CPU = torch.device("cpu")
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


# attention shapes beyond the default (4 query heads, 2 K/V heads, head size 32): the
# attention kernels are compiled per head size and go 16 and 64 dims at a time
WIDE_HEADS = {
    "llama-d96": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=96),  # 64 + 32 dims
    "llama-d128": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=128),  # 4 heads share one K/V head
    "llama-g3": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=192, head_dim=64),  # the default model's
}


def tiny_checkpoint(tmp_path, family: str):
    torch.manual_seed(0)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**COMMON),
        **{name: (lambda extra=extra: transformers.LlamaConfig(**{**COMMON, **extra})) for name, extra in WIDE_HEADS.items()},
        "qwen2": lambda: transformers.Qwen2Config(**COMMON),  # QKV bias
        "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
    }[family]()
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / family)
    return read_checkpoint(tmp_path / family)


def models(tmp_path, family: str):
    """(native bf16, PyTorch-path bf16, fp32) builds of one tiny random model."""
    ckpt = tiny_checkpoint(tmp_path, family)
    fast = build_model(ckpt.config, ckpt.tensors, torch.bfloat16, "cpu", 512)
    slow = build_model(ckpt.config, ckpt.tensors, torch.bfloat16, "cpu", 512)
    slow.native = slow.native_head = None
    ref = build_model(ckpt.config, ckpt.tensors, torch.float32, "cpu", 512)
    return fast, slow, ref


def new_cache(model, slots: int = 4) -> KVCache:
    """A cache of the K/V dtype the engine gives `model`: bf16 for the native layers."""
    cfg = model.config
    dtype = torch.bfloat16 if model.native is not None else torch.float32
    return KVCache(cfg.num_layers, slots, 512, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")


def run(model, cache, items):
    """One forward; items = [(slot, cache_start, token ids, tree mask or None)]; hidden [T, H]."""
    ids, pos = [], []
    for slot, start, toks, tree in items:
        cache.ensure(slot, start + len(toks))
        ids += toks
        if tree is None:
            pos += range(start, start + len(toks))
        else:  # depth of each node = ancestors - 1
            pos += [start + int(tree[i].sum()) - 1 for i in range(len(toks))]
    trees = [tree for *_, tree in items]
    meta = build_attention_metadata(
        cache, [s for s, *_ in items], [len(t) for _, _, t, _ in items], [c for _, c, _, _ in items], CPU,
        tree_masks=trees if any(t is not None for t in trees) else None,
    )
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.tensor(pos), meta, cache)


def decode_alone(model, ids: list[int], prefill: int) -> torch.Tensor:
    """Hidden states of ids[prefill:], each decoded on its own after one prefill."""
    cache = new_cache(model)
    slot = cache.allocate()
    run(model, cache, [(slot, 0, ids[:prefill], None)])
    cache.commit(slot, prefill)
    rows = []
    for i in range(prefill, len(ids)):
        rows.append(run(model, cache, [(slot, i, [ids[i]], None)]))
        cache.commit(slot, i + 1)
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["llama", "qwen2", *WIDE_HEADS])
def test_native_layers_as_accurate_as_pytorch(tmp_path, family, native_lib):
    fast, slow, ref = models(tmp_path, family)
    assert fast.native is not None
    ids = torch.randint(0, VOCAB, (60,)).tolist()
    got = {}
    for name, model in (("native", fast), ("pytorch", slow), ("fp32", ref)):
        got[name] = model.compute_logits(torch.cat([decode_alone(model, ids, 40)])).float()
    err_native = (got["native"] - got["fp32"]).abs().mean().item()
    err_torch = (got["pytorch"] - got["fp32"]).abs().mean().item()
    print(f"{family}: mean |logit - fp32|: native {err_native:.2e}, pytorch {err_torch:.2e}")
    assert err_native <= 1.5 * err_torch + 1e-4
    assert (got["native"] - got["pytorch"]).abs().max().item() < 0.1


@pytest.mark.parametrize("family", ["llama", *WIDE_HEADS])
def test_native_row_invariance(tmp_path, monkeypatch, prompt_tiles, family):
    model, _, _ = models(tmp_path, family)
    ids = torch.randint(0, VOCAB, (48,)).tolist()
    alone = decode_alone(model, ids, 40)  # rows 40..47, one token per forward

    # one prefill of everything, alone and after another sequence's prompt (78 rows: the
    # AVX2 library's wide tiles)
    cache = new_cache(model)
    slot, first = cache.allocate(), cache.allocate()
    assert torch.equal(run(model, cache, [(slot, 0, ids, None)])[40:], alone)
    cache.truncate(slot, 0)
    prompt = torch.randint(0, VOCAB, (30,)).tolist()
    assert torch.equal(run(model, cache, [(first, 0, prompt, None), (slot, 0, ids, None)])[70:], alone)

    # a chain of 8 "drafts" verified at once, next to another sequence's prefill chunk
    cache = new_cache(model)
    a, b = cache.allocate(), cache.allocate()
    run(model, cache, [(a, 0, ids[:40], None)])
    cache.commit(a, 40)
    other = torch.randint(0, VOCAB, (23,)).tolist()
    hidden = run(model, cache, [(b, 0, other, None), (a, 40, ids[40:], None)])
    assert torch.equal(hidden[23:], alone)

    # a token tree holding the chain as one branch, its nodes between other branches'
    # nodes (so a chain row's ancestors are not consecutive keys): that branch's rows are
    # the chain's
    side = torch.randint(0, VOCAB, (4,)).tolist()
    tokens = [ids[40], side[0], ids[41], ids[42], side[1], side[2], ids[43], ids[44], side[3], ids[45], ids[46], ids[47]]
    parents = [-1, 0, 0, 2, 2, 4, 3, 6, 6, 7, 9, 10]
    chain = [0, 2, 3, 6, 7, 9, 10, 11]
    tree = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
    for i, p in enumerate(parents):
        tree[i, i] = True
        if p >= 0:
            tree[i] |= tree[p]
    assert [tokens[i] for i in chain] == ids[40:] and all(tree[c].sum() == d + 1 for d, c in enumerate(chain))
    cache.truncate(a, 40)
    hidden = run(model, cache, [(a, 40, tokens, tree)])
    assert torch.equal(hidden[chain], alone)

    # the same cache entries read through a gathered index instead of one consecutive run
    monkeypatch.setattr(KVCache, "contiguous_start", lambda self, slot, end: None)
    for runs in (layers.MAX_READ_RUNS, 0):
        monkeypatch.setattr(layers, "MAX_READ_RUNS", runs)
        cache.truncate(a, 40)
        assert torch.equal(run(model, cache, [(a, 40, ids[40:], None)]), alone)

    # blocks of 4 in a scrambled order: 16 keys over pool entries 0-3, 8-11, 4-7, 12-15
    # (first and last look consecutive) must still be read key by key
    cfg = model.config
    small = KVCache(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cpu", block_size=4)
    c = small.allocate()
    small.ensure(c, 48)
    table = small.tables[c]
    small.tables[c] = [table[4 * (i // 4) + (0, 2, 1, 3)[i % 4]] for i in range(len(table))]
    run(model, small, [(c, 0, ids[:40], None)])
    small.commit(c, 40)
    assert torch.equal(run(model, small, [(c, 40, ids[40:], None)]), alone)


@pytest.fixture(params=["wide", "narrow"])
def prompt_tiles(request, native_lib):
    """The AVX2 library's prompt-chunk path both ways (wide tiles from 32 rows, or narrow
    tiles at every size), whichever one this CPU was found faster on; the AMX library once."""
    if not hasattr(native_lib, "ss_set_wide_rows"):
        if request.param == "narrow":
            pytest.skip("the AMX library has one path")
        yield native_lib
        return
    chosen = native_lib.ss_wide_rows()
    native_lib.ss_set_wide_rows(32 if request.param == "wide" else 0)
    try:
        yield native_lib
    finally:
        native_lib.ss_set_wide_rows(chosen)


@pytest.mark.parametrize(("rows", "inputs"), [(37, 64), (133, 1216), (21, 224)])  # inputs % 32 == 0 for AMX
def test_native_linear_is_exact_per_row(prompt_tiles, rows, inputs):
    """A row is the same alone or among others; with the AVX2 library's wide tiles, 37 and
    133 rows take them (weights widened once, in slices when the inputs are many), 1 row
    the narrow ones, and 5-11 rows the narrow ones over slices of the inputs (224 inputs:
    the last slice shorter); either path gives every output alike."""
    lib = prompt_tiles
    torch.manual_seed(0)
    w = (torch.randn(96, inputs) * 0.1).bfloat16()
    bias = torch.randn(96)
    x = torch.randn(rows, inputs).bfloat16()
    packed = native.vnni_pack(w)
    y = native.linear(lib, packed, bias, x)
    ref = x.float() @ w.float().T + bias
    assert (y.float() - ref).abs().max().item() <= 2 * ref.abs().max().item() / 128  # one bf16 rounding
    for m in sorted({0, 5, 16, 36, rows - 2, rows - 1} & set(range(rows))):
        assert torch.equal(native.linear(lib, packed, bias, x[m : m + 1].contiguous())[0], y[m])
    for m in (4, 5, 7, 11, 12):
        assert torch.equal(native.linear(lib, packed, bias, x[3 : 3 + m].contiguous()), y[3 : 3 + m])
    if hasattr(lib, "ss_set_wide_rows"):  # the other path, the same outputs
        wide = lib.ss_wide_rows()
        lib.ss_set_wide_rows(0 if wide else 32)
        assert torch.equal(native.linear(lib, packed, bias, x), y)


def test_native_lm_head_rows_are_exact_and_invariant(tmp_path, native_lib):
    model, slow, _ = models(tmp_path, "llama")
    assert model.native_head is not None and slow.native_head is None
    assert not hasattr(model.lm_head, "packed")  # no second (oneDNN) copy next to the native one
    x = torch.randn(70, model.config.hidden_size).to(torch.bfloat16)
    full = model.compute_logits(x)
    assert full.dtype == torch.float32 and torch.equal(full, full.bfloat16().float())  # bf16 values, as before
    for i in (0, 5, 16, 36, 69):  # a row is the same alone or among others (70 rows: the wide tiles)
        assert torch.equal(model.compute_logits(x[i : i + 1]), full[i : i + 1])
    assert model.compute_logits(x[:0]).shape == (0, VOCAB)
    exact = x.float() @ model.lm_head.weight.float().T  # the same bf16 weights, an fp32 sum
    assert ((full - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()  # one bf16 rounding of an fp32-accurate sum
    assert (full - slow.compute_logits(x)).abs().max().item() <= 2**-6 * exact.abs().max().item()


def test_native_final_norm_is_torch_rms_norm_to_a_rounding(tmp_path, native_lib):
    model, _, _ = models(tmp_path, "llama")
    torch.manual_seed(0)
    x = (torch.randn(300, model.config.hidden_size) * 4).bfloat16()
    got, want = model.native.norm(x, model.norm), model.norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got != want).float().mean().item() < 1e-3  # the sums run in another order: rare roundings
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()  # one bf16 rounding apart
    for i in (0, 7, 299):  # a row is the same alone or among others
        assert torch.equal(model.native.norm(x[i : i + 1], model.norm)[0], got[i])
    assert torch.equal(model.native.norm(x.float(), model.norm), model.norm(x.float()))  # not bf16: torch's


def test_native_linear_module(native_lib):
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 96).bfloat16()
    holder = torch.nn.Sequential(module, torch.nn.Linear(10, 7).bfloat16())  # 10 x 7: no kernel shape, kept
    assert native.pack_native_linears(holder, native_lib) == 1
    fast = holder[0]
    assert isinstance(fast, native.NativeLinear) and isinstance(holder[1], torch.nn.Linear)
    x = torch.randn(2, 5, 64).bfloat16()
    y = fast(x)
    assert y.shape == (2, 5, 96) and y.dtype == torch.bfloat16
    ref = x.float() @ module.weight.float().T + module.bias.float()
    assert (y.float() - ref).abs().max().item() <= 2 * ref.abs().max().item() / 128
    assert torch.equal(fast(x[1]), y[1])  # rows do not depend on the others


def test_default_dtype_is_bf16_where_native_layers_run(tmp_path, monkeypatch):
    from specserve import api

    qwen3 = tiny_checkpoint(tmp_path, "qwen3").config
    llama = tiny_checkpoint(tmp_path, "llama").config
    monkeypatch.setattr(api, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(native, "library", lambda: object())  # a CPU with the AVX2 library only
    assert api.resolve_dtype(None, CPU) == torch.bfloat16  # the default model
    assert api.resolve_dtype(None, CPU, llama) == torch.bfloat16
    assert api.resolve_dtype(None, CPU, qwen3) == torch.float32  # PyTorch's bf16 would be slow here
    assert api.resolve_dtype("float32", CPU, llama) == torch.float32
    monkeypatch.setattr(native, "library", lambda: None)
    assert api.resolve_dtype(None, CPU, llama) == torch.float32


def test_avx2_library_on_request():
    code = "from specserve.model import native; print(native.status())"
    env = {**os.environ, "SPECSERVE_NATIVE": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("native (AVX2)" if "AVX2" in KINDS else "pytorch (")


def test_other_families_and_dtypes_keep_pytorch(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, "qwen3")
    model = build_model(ckpt.config, ckpt.tensors, torch.bfloat16, "cpu", 512)
    assert model.native is None
    assert "qwen3" in native.supports(model)
    ckpt = tiny_checkpoint(tmp_path, "llama")
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, "cpu", 512)
    assert model.native is None and model.native_head is None
    assert native.describe(model).startswith("pytorch (native layers run bf16 models on the CPU only")


def test_disabled_by_environment():
    code = "from specserve.model import native; print(native.library() is None, native.unavailable_reason())"
    env = {**os.environ, "SPECSERVE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True disabled by SPECSERVE_NATIVE"


def test_native_greedy_head_is_the_argmax_of_its_logits(native_lib):
    """`NativeLMHead.greedy`: each row's argmax of the head's own logits, the first of equal
    maxima, alone or among other rows (on the AMX library a fused kernel that writes no
    logits; 2 threads merge their halves of the vocabulary). A NaN logit is the maximum, as
    torch's argmax takes it."""
    torch.manual_seed(2)
    vocab, hidden = 4096, 128
    w = torch.randn(vocab, hidden) * 0.05
    w[33] *= 4
    w[900] = w[33]  # exact ties in another group, another thread's half and the same group
    w[3000] = w[33]
    w[40] = w[33]
    w[5] = 0  # a zero row: every input ties it at 0
    w = w.bfloat16()
    head = native.NativeLMHead(w, native_lib)
    x = torch.randn(40, hidden) * 3
    x[8:12] = w[[33, 40, 900, 3000]].float() * 40  # aligned with the tied rows: ties at the top
    x[12] = 0  # every logit 0: the first index wins
    x[13, :] = -x[8]  # the tied rows at the bottom
    x = x.bfloat16()
    full = head(x)
    want = full.argmax(dim=-1)
    assert want[8:12].tolist() == [33] * 4 and want[12].item() == 0
    for rows in (x, x[:1], x[8:9], x[12:14], x[3:20], x[:33]):
        rows = rows.contiguous()
        assert torch.equal(head.greedy(rows), head(rows).argmax(dim=-1))
    assert torch.equal(head.greedy(x), want)
    for i in (0, 8, 12, 13, 39):
        assert torch.equal(head.greedy(x[i : i + 1].contiguous()), want[i : i + 1])
    bad = x[:3].clone()
    bad[1, 4] = float("nan")  # every logit of row 1 NaN
    bad[2, 0] = float("inf")  # inf and -inf logits in row 2, some inf * 0 = NaN
    assert torch.equal(head.greedy(bad), head(bad).argmax(dim=-1))
    assert head.greedy(x[:0]).shape == (0,)


# ---------------------------------------------------------------- the screened greedy LM head

needs_screen = pytest.mark.skipif(
    native.load("AVX2") is None or not hasattr(native.load("AVX2"), "ss_screen"),
    reason="the screened LM head is in the AVX2 library, which does not run here",
)


def _screened_head(weight: torch.Tensor) -> native.NativeLMHead:
    head = native.NativeLMHead(weight, native.load("AVX2"), screen=True)
    assert head.screen is not None
    return head


@needs_screen
def test_screen_bounds_hold_and_keep_every_argmax_and_tie():
    """Every bf16 logit lies under its bound and the row maximum above the row's lower bound,
    so the argmax (first of ties) is the full head's; candidates hold the exact logits."""
    torch.manual_seed(0)
    vocab, hidden = 4096, 128
    w = torch.randn(vocab, hidden) * 0.05
    w[:, 7] *= 8  # an outlier dimension, as real heads have
    w[33] *= 4  # long enough to win where the input points its way
    w[900] = w[33]  # exact ties: the same row twice, in another group
    w[40] = w[33]  # and in the same group
    w[2000] = w[1000]
    w[2000, 0] += 1e-3  # a near tie (a bf16 step or so apart)
    w = w.bfloat16()
    head = _screened_head(w)
    x = torch.randn(64, hidden) * 3
    x[:8, 7] *= 20  # outliers in the input
    x[8:16] = w[[33, 40, 900, 1000, 2000, 5, 6, 7]].float() * 40  # aligned with a row: ties at the top
    x[16:24] = x[16:24] * 1e-3  # nearly flat rows: many candidates, the full head takes over
    x = x.bfloat16()
    screened = 0
    for m in range(1, native.ScreenedHead.MAX_ROWS + 1):
        for i in range(0, 64 - m + 1, m):
            rows = x[i : i + m].contiguous()
            full = head(rows)
            got = head.argmax_logits(rows)
            assert torch.equal(got.argmax(dim=-1), full.argmax(dim=-1))
            kept = torch.isfinite(got)
            assert torch.equal(got[kept], full[kept])
            if not kept.all():
                screened += 1
                hi, glo = head.screen._scratch[m][:2]
                assert (full <= hi).all()  # the upper bounds
                assert (full.amax(dim=1) >= glo.amax(dim=1)).all()  # the lower bound of each maximum
    assert screened > 60  # the screen decided nearly every call
    tied = head.argmax_logits(x[8:9].contiguous())
    assert tied.argmax().item() == 33 and tied[0, 40] == tied[0, 33] == tied[0, 900]  # the first of the ties


@needs_screen
def test_screen_hands_over_to_the_full_head():
    torch.manual_seed(1)
    w = (torch.randn(512, 64) * 0.05).bfloat16()
    head = _screened_head(w)
    x = torch.randn(native.ScreenedHead.MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(head.argmax_logits(x), head(x))  # more rows than the screen pays for
    bad = x[:1].clone()
    bad[0, 3] = float("inf")
    assert not head.screen.screen(bad, head.packed, torch.empty(1, 512))
    assert torch.equal(head.argmax_logits(bad).isnan(), head(bad).isnan())  # the full head's logits
    flat = torch.zeros(1, 64).bfloat16()  # every logit 0: all 512 tie, more than CAP candidates
    assert torch.equal(head.argmax_logits(flat), head(flat))
    tiny = (x[:1].float() * 1e-37).bfloat16()  # logits in fp32's subnormal range: not bounded
    assert not head.screen.screen(tiny, head.packed, torch.empty(1, 512))
    w[5] *= 1e-25  # a row whose squares underflow: no screen for this head
    assert native.NativeLMHead(w, native.load("AVX2"), screen=True).screen is None


@needs_screen
def test_greedy_decoding_is_the_same_with_and_without_the_screen(llm_bf16):
    """Plain and speculative greedy decoding with the screened head (the default on the
    AVX2 library) give the tokens of the full head."""
    from specserve import SamplingParams

    head = llm_bf16.model.native_head
    if head is None or head.screen is None:
        pytest.skip("the default model does not run on the AVX2 library here")
    screen = head.screen
    prompts = [llm_bf16.chat_prompt([{"role": "user", "content": q}])
               for q in ("Name three colours and describe each.", "Write a haiku about the sea.")]
    params = SamplingParams(max_tokens=48)
    try:
        for spec in (None, "ngram"):
            llm_bf16.set_spec(spec)
            outs = {}
            for on in (False, True):
                head.screen = screen if on else None
                screen.groups = -1
                outs[on] = [o.token_ids for o in llm_bf16.generate(prompts, params)]  # batched: 2 rows
                outs[on] += [llm_bf16.generate([p], params)[0].token_ids for p in prompts]  # alone: 1 row
                assert (screen.groups > 0) == on  # the screen decided (a handful of groups), or never ran
            assert outs[True] == outs[False], spec
    finally:
        head.screen = screen
        llm_bf16.set_spec(None)


def test_prompt_tile_choice_can_be_pinned(monkeypatch, native_lib):
    if not hasattr(native_lib, "ss_set_wide_rows"):
        pytest.skip("the AMX library has one path")
    monkeypatch.setenv("SPECSERVE_WIDE_ROWS", "0")
    assert native._choose_wide_rows(native_lib) == 0
    monkeypatch.setenv("SPECSERVE_WIDE_ROWS", "32")
    assert native._choose_wide_rows(native_lib) == 32
    monkeypatch.setenv("SPECSERVE_WIDE_ROWS", "wide")
    with pytest.raises(ValueError, match="SPECSERVE_WIDE_ROWS"):
        native._choose_wide_rows(native_lib)
    monkeypatch.delenv("SPECSERVE_WIDE_ROWS")
    chosen = native_lib.ss_wide_rows()
    try:
        assert native._choose_wide_rows(native_lib, reps=1) in (0, 32)  # timed: either may win
    finally:
        native_lib.ss_set_wide_rows(chosen)
