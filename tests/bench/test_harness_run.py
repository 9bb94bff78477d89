"""The harness's runner contract on a tiny slice: one two-turn question, a few tokens, every method of ours
(and the peers where installed; skipped cleanly where not)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from specserve.bench.common import PlainMargins
from specserve.bench.harness import HarnessConfig, prepare_prompts, run_requests
from specserve.bench.methods import OursRunner
from specserve.bench.records import PLAIN, RequestRecord
from specserve.bench.workload import filter_categories, load_questions
from specserve.sampling.params import SamplingParams

MAX_TOKENS = 6
TIMEOUT = 900  # the shared 2-core machines can be very slow under load


@pytest.fixture(scope="module")
def prompts(llm_bf16, questions_file):
    question = filter_categories(load_questions(questions_file), ["writing"])[:1]
    return prepare_prompts(llm_bf16, question, multi_turn=True, max_tokens=MAX_TOKENS)


def test_prepare_prompts_second_turn_uses_the_models_own_answer(llm_bf16, prompts):
    first, second = prompts
    assert (first.turn, second.turn) == (1, 2) and second.prompt_id == first.prompt_id + "-t2"
    answer = llm_bf16.generate([first.token_ids], SamplingParams(max_tokens=MAX_TOKENS))[0]  # greedy
    assert second.token_ids[: len(first.token_ids) - 3] == first.token_ids[: len(first.token_ids) - 3]
    text = llm_bf16.tokenizer.decode(second.token_ids)
    assert answer.text.strip() in text and first.question.turns[1][:40] in text


def _run(runners, prompts, llm) -> list[RequestRecord]:
    config = HarnessConfig(methods=tuple(r.name for r in runners), max_tokens=MAX_TOKENS, warmup=0)
    sink = io.StringIO()
    records = run_requests(runners, prompts, config, PlainMargins(llm), sink)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [RequestRecord.from_dict(x) for x in lines] == records  # every record written as it is made
    return records


def test_runner_contract_ours(llm_bf16, prompts):
    runners = [OursRunner(llm_bf16, name, spec, 4, adaptive=False)
               for name, spec in ((PLAIN, None), ("ngram", "ngram"), ("suffix", "suffix"), ("layer-skip", "layer-skip"))]
    try:
        records = _run(runners, prompts, llm_bf16)
    finally:
        llm_bf16.set_spec(None)
    assert [(r.method, r.turn) for r in records] == [(m, t) for t in (1, 2) for m in (PLAIN, "ngram", "suffix", "layer-skip")]
    for r in records:
        assert 0 < r.new_tokens <= MAX_TOKENS and r.new_tokens == len(r.token_ids)
        assert r.wall_s > 0 and r.ttft_s is not None and 0 < r.forward_passes <= r.new_tokens
        assert r.peer is None and r.category == "writing"
        if r.method != PLAIN:
            assert r.near_tie_tolerance == 0.5 and r.drafted_per_position is not None
            assert (r.first_divergence is None) == (r.divergence_margin is None)


def _peer_runners(names, llm):
    from specserve.bench.methods import llama_cpp_runners, transformers_runners

    if names[0].startswith("transformers"):
        return transformers_runners(names, llm, None, [])
    return llama_cpp_runners(names, llm)


@pytest.mark.parametrize(
    "module, names",
    [("transformers", ["transformers", "transformers+prompt-lookup"]), ("llama_cpp", ["llama.cpp", "llama.cpp+prompt-lookup"])],
)
def test_runner_contract_peers(llm_bf16, prompts, module, names):
    pytest.importorskip(module)
    runners = [OursRunner(llm_bf16, PLAIN, None, None, adaptive=False), *_peer_runners(names, llm_bf16)]
    records = _run(runners, prompts[:1], llm_bf16)
    assert [r.method for r in records] == [PLAIN, *names]
    for r in records[1:]:
        assert r.peer is not None and 0 < r.new_tokens <= MAX_TOKENS and r.ttft_s is not None
        assert 0 < r.forward_passes <= r.new_tokens + 1 and r.drafted_tokens is not None


def test_bench_run_cli_writes_jsonl_meta_and_report(tmp_path, questions_file):
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "bench", "run", "--methods", "ngram", "--categories", "rag",
         "--max-tokens", "4", "--warmup", "0", "--no-adaptive-spec", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = next(tmp_path.glob("harness_*.jsonl"))
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    assert [r["method"] for r in rows] == [PLAIN, "ngram"] and rows[0]["prompt_id"].startswith("rag-")
    meta = json.loads(raw.with_suffix(".meta.json").read_text())
    assert meta["methods"] == [PLAIN, "ngram"] and "commit" in meta["machine"]
    assert "### Overall" in raw.with_suffix(".md").read_text()


def test_bench_run_bad_flags_are_one_line():
    for argv in (["--methods", "warp"], ["--draft-model", "/no/such/dir"], ["--categories", ","]):
        proc = subprocess.run([sys.executable, "-m", "specserve.cli", "bench", "run", *argv],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert argv[0] in proc.stderr


def test_llama_cpp_prompt_lookup_takes_prompts_longer_than_a_batch(llm_bf16):
    pytest.importorskip("llama_cpp")
    from specserve.bench.methods import llama_cpp_runners

    (runner,) = llama_cpp_runners(["llama.cpp+prompt-lookup"], llm_bf16)
    ids = llm_bf16.chat_prompt([{"role": "user", "content": "the cat sat on the mat. " * 80}])
    assert len(ids) > 512  # beyond llama.cpp's n_batch of 512
    gen = runner.generate(ids, 4, ignore_eos=True)
    assert len(gen.token_ids) == 4 and gen.forward_passes >= 1
