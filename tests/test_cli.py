"""The `specserve` command line, run as a user would (subprocesses), and the bench workload loader.

Only six invocations load the model (a few seconds each); `--help` and most bad flags fail before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specserve.bench.workload import (
    QUESTIONS_ENV,
    categories,
    find_questions_file,
    load_questions,
    select_per_category,
)

TIMEOUT = 600  # the shared 2-core machines can be very slow under load


def cli(*args: str, stdin: str | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = [script] if script else [sys.executable, "-m", "specserve.cli"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True, timeout=TIMEOUT)


def installed_script() -> str | None:
    beside = Path(sys.executable).parent / "specserve"
    return str(beside) if beside.exists() else shutil.which("specserve")


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- no model load


def test_flags_are_checked_before_pytorch_is_imported():
    """--help and flag errors (the --spec grammar included) come back without importing
    PyTorch (0.1 s, not 2-3 s): the packages load their PyTorch parts on first use."""
    code = (
        "import sys\n"
        "from specserve import cli\n"
        "parser = cli.build_parser()\n"
        "args = parser.parse_args(['generate', '--spec', 'ngram+eagle', 'x'])\n"
        "cli._check_spec(parser, args.spec)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('specserve'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", [[], ["generate"], ["info"], ["bench"], ["bench", "plain"], ["bench", "spec"]])
def test_help(command):
    proc = cli(*command, "--help")
    assert_ok(proc)
    assert proc.stdout.startswith("usage: specserve")
    if command == ["generate"]:
        for flag in ("--temperature", "--top-p", "--stop", "--chat", "--system", "--no-stream", "--stats", "PROMPT"):
            assert flag in proc.stdout
        for flag in ("--spec", "--num-spec-tokens", "--no-adaptive-spec"):
            assert flag in proc.stdout
    if command == ["bench", "plain"]:
        for flag in ("--n-per-category", "--max-tokens", "--repetitions", "--warmup", "--no-peer", "--out"):
            assert flag in proc.stdout
    if command == ["bench", "spec"]:
        for flag in ("--methods", "--draft-model", "--draft-layers", "--n-per-category", "--categories", "--max-tokens",
                     "--repetitions", "--warmup", "--num-spec-tokens", "--out"):
            assert flag in proc.stdout


def test_installed_script_help():
    script = installed_script()
    if script is None:
        pytest.skip("the `specserve` console script is not installed")
    proc = cli("--help", script=script)
    assert_ok(proc)
    assert "generate" in proc.stdout and "bench" in proc.stdout


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "2"], "--top-p"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--model", "/nonexistent"], "--model"),
        (["--presence-penalty", "nan"], "--presence-penalty"),
    ],
)
def test_bad_flags(args, flag):
    proc = cli("generate", *args, "Hello")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0] and flag in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--spec", "bogus"],
        ["--spec", "draft-model:/nonexistent"],
        ["--spec", "draft-model"],
        ["--spec", "ngram:3"],
        ["--spec", "layer-skip:a,b"],
        ["--spec", "ngram+suffix"],
        ["--spec", "ngram+eagle:/nonexistent"],
        ["--spec", "suffix+bogus"],
        ["--spec", "ngram", "--num-spec-tokens", "0"],
        ["--spec", "ngram", "--num-spec-tokens", "33"],
        ["--num-spec-tokens", "4"],  # without --spec
    ],
)
def test_bad_spec_fails_before_loading(args):
    proc = cli("generate", *args, "Hello")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error:" in lines[0] and ("--spec" in lines[0] or "--num-spec-tokens" in lines[0])
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_unknown_spec_names_the_choices():
    proc = cli("generate", "--spec", "bogus", "Hello")
    assert "error: --spec: unknown method 'bogus'" in proc.stderr and "draft-model:PATH" in proc.stderr


def test_bad_hybrid_spec_names_the_whole_spec():
    proc = cli("generate", "--spec", "ngram+suffix", "Hello")
    assert "error: --spec: ngram+ pairs with a model drafter" in proc.stderr and "'ngram+suffix'" in proc.stderr


def test_temperature_error_echoes_value():
    proc = cli("generate", "--temperature", "-1", "Hello")
    assert "error: --temperature must be >= 0, got -1" in proc.stderr


def test_missing_command():
    proc = cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- with the default model


def test_info():
    script = installed_script()  # the console script when installed, else `python -m`
    proc = cli("info", "--dtype", "float32", script=script)
    assert_ok(proc)
    info = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    for key in ("model", "architecture", "family", "parameters", "dtype", "device", "max_model_len"):
        assert key in info
    assert info["family"] == "llama"
    assert info["dtype"] == "float32"
    assert int(info["parameters"]) > 100_000_000


def test_generate_greedy_from_stdin_with_stats():
    proc = cli("generate", "--max-tokens", "8", "--stats", "-", stdin="Hello")
    assert_ok(proc)
    assert proc.stdout.strip()
    stats = dict(line.split(": ", 1) for line in proc.stderr.strip().splitlines() if ": " in line)
    assert 1 <= int(stats["generated tokens"]) <= 8
    assert int(stats["prompt tokens"]) >= 1
    assert "ttft" in stats and "decode tokens/s" in stats


def test_generate_spec_stats():
    proc = cli("generate", "--spec", "ngram", "--num-spec-tokens", "4", "--max-tokens", "16", "--stats", "--no-stream",
               "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,")
    assert_ok(proc)
    stats = dict(line.split(": ", 1) for line in proc.stderr.strip().splitlines() if ": " in line)
    assert stats["spec"].startswith("ngram (num_spec_tokens 4, adaptive)")
    generated, forwards = int(stats["generated tokens"]), int(stats["forward passes"])
    assert 1 <= forwards <= generated <= 16
    assert float(stats["acceptance length"]) == pytest.approx(generated / forwards, abs=0.01)
    assert int(stats["accepted tokens"]) <= int(stats["drafted tokens"])
    assert "acceptance rate" in stats


def test_generate_draft_model_with_another_vocabulary(tmp_path):
    """A draft model whose vocabulary differs from the target's is refused at start-up, naming --spec."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({"model.embed_tokens.weight": torch.zeros(1000, 64)}, str(tmp_path / "model.safetensors"))
    proc = cli("generate", "--spec", f"draft-model:{tmp_path}", "--max-tokens", "4", "Hello")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error: --spec" in lines[0] and "vocabulary" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_generate_chat_seeded_is_reproducible():
    args = ["generate", "--chat", "--max-tokens", "8", "--seed", "1", "--temperature", "0.7", "What is the sky?"]
    streamed = cli(*args)
    whole = cli(*args[:-1], "--no-stream", args[-1])
    assert_ok(streamed)
    assert_ok(whole)
    assert streamed.stdout.strip()
    assert streamed.stdout == whole.stdout  # same seed: same text, streamed or not


# ---------------------------------------------------------------- bench workload




def test_workload_first_n_of_every_category(questions_file):
    questions = load_questions(questions_file)
    cats = categories(questions)
    assert len(cats) == 13 and "writing" in cats and "rag" in cats
    chosen = select_per_category(questions, 2)
    assert categories(chosen) == cats
    for cat in cats:
        mine = [q for q in chosen if q.category == cat]
        assert mine == [q for q in questions if q.category == cat][:2]
    assert all(q.turns and isinstance(q.turns[0], str) for q in chosen)
    with pytest.raises(ValueError):
        select_per_category(questions, 0)


def test_workload_env_override(tmp_path, monkeypatch):
    path = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": "ab"[i % 2], "turns": [f"q{i}"]} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    monkeypatch.setenv(QUESTIONS_ENV, str(path))
    assert find_questions_file() == path
    chosen = select_per_category(load_questions(), 2)
    assert [q.question_id for q in chosen] == [0, 2, 1, 3]
    monkeypatch.setenv(QUESTIONS_ENV, str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match=QUESTIONS_ENV):
        find_questions_file()


def test_workload_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_questions_file(env={}, cwd=tmp_path, package_dir=tmp_path)


def test_bench_summary_and_report():
    plain = pytest.importorskip("specserve.bench.plain")
    from specserve.bench.workload import Question

    prompts = [plain.Prompt(Question(i, cat, ("q",)), [1, 2, 3]) for i, cat in ((1, "a"), (2, "b"))]
    records = []
    for rep in range(3):
        for method, wall in ((plain.OURS, 1.0 + rep), (plain.PEER, 2.0)):
            for p in prompts:
                ids = [5, 6] if method == plain.OURS or p.question.question_id == 1 else [5, 7]
                q = p.question
                records.append(plain.Record(method, q.question_id, q.category, rep, 3, 2, wall, None, ids))
    summaries = {m: plain.summarize(records, m, 3) for m in (plain.OURS, plain.PEER)}
    assert summaries[plain.OURS].per_repetition == [2.0, 1.0, pytest.approx(2 / 3)]  # 4 tokens / total wall
    assert summaries[plain.OURS].median == 1.0 and summaries[plain.PEER].median == 1.0
    assert summaries[plain.OURS].deterministic
    model = {"model": "/x/m.gguf", "family": "llama", "parameters": 1_000_000}
    res = plain.BenchResult({"CPU": "test"}, model, prompts, 2, 3, 1, records, summaries)
    assert [d for _, d in res.agreement()] == [None, 1]
    report = plain.format_report(res)
    assert "| specserve | 1.0 | 0.7 |" in report and "1.00x" in report
    assert "identical to transformers: 1/2 prompts" in report and "b-2 at token 1" in report
