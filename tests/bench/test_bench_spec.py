"""`specserve bench spec`: the report maths on hand-made records, argument errors, one tiny real run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from specserve.bench.common import Prompt, first_divergence
from specserve.bench.spec import (
    PLAIN,
    SpecBenchResult,
    SpecRecord,
    Totals,
    category_speedups,
    equivalence,
    format_report,
    macro_speedup,
    parse_methods,
    position_acceptance,
    speedup,
)
from specserve.bench.workload import QUESTIONS_ENV, Question, filter_categories

TIMEOUT = 600  # the shared 2-core machines can be very slow under load


def rec(method, prompt_id, category, tokens, forwards, wall, rep=0, *, drafted=0, accepted=0, acc_pos=(), dra_pos=(),
        draft=0.0, verify=0.0, ids=None, plain_ids=None, margin=None):
    ids = list(range(tokens)) if ids is None else ids
    div = None if plain_ids is None else first_divergence(plain_ids, ids)
    return SpecRecord(
        method=method, spec=None if method == PLAIN else method, prompt_id=prompt_id, category=category,
        repetition=rep, prompt_tokens=10, new_tokens=tokens, finish_reason="stop", wall_s=wall, ttft_s=0.01,
        forward_passes=forwards, drafted_tokens=drafted, accepted_tokens=accepted,
        accepted_per_position=list(acc_pos), drafted_per_position=list(dra_pos), draft_time_s=draft,
        verify_time_s=verify, token_ids=ids, identical_to_plain=div is None, first_divergence=div,
        divergence_margin=margin, near_tie_tolerance=None if method == PLAIN else 0.5,
    )


@pytest.fixture
def records():
    # category a: prompts 1 and 2; category b: prompt 3
    return [
        rec(PLAIN, 1, "a", 10, 10, 1.0, verify=0.8),
        rec("ngram", 1, "a", 10, 5, 0.5, drafted=8, accepted=5, acc_pos=[3, 2], dra_pos=[5, 3], draft=0.05, verify=0.4),
        rec(PLAIN, 2, "a", 30, 30, 3.0, verify=2.5),
        rec("ngram", 2, "a", 30, 10, 1.0, drafted=25, accepted=20, acc_pos=[10, 8, 2], dra_pos=[10, 10, 5]),
        rec(PLAIN, 3, "b", 20, 20, 2.0),
        rec("ngram", 3, "b", 20, 20, 4.0, ids=[7] * 20, plain_ids=list(range(20)), margin=0.25),
    ]


def test_totals_and_acceptance_length(records):
    t = Totals.of(r for r in records if r.method == "ngram")
    assert (t.requests, t.tokens, t.forwards, t.drafted, t.accepted) == (3, 60, 35, 33, 25)
    assert t.acceptance_length == pytest.approx(60 / 35)  # total tokens / total forwards, not a mean of ratios
    assert t.tokens_per_s == pytest.approx(60 / 5.5)
    assert t.acceptance_rate == pytest.approx(25 / 33)
    assert t.draft_share == pytest.approx(0.05 / 5.5) and t.verify_share == pytest.approx(0.4 / 5.5)
    assert math.isnan(Totals().acceptance_length) and math.isnan(Totals().tokens_per_s)


def test_speedups(records):
    # category a: plain 40 tok / 4 s = 10 tok/s, ngram 40 tok / 1.5 s
    assert speedup(records, "ngram", "a") == pytest.approx((40 / 1.5) / 10)
    assert speedup(records, "ngram", "b") == pytest.approx(0.5)
    assert category_speedups(records, "ngram", ["a", "b"]) == {"a": pytest.approx(40 / 15), "b": pytest.approx(0.5)}
    assert macro_speedup(records, "ngram", ["a", "b"]) == pytest.approx((40 / 15 + 0.5) / 2)
    assert math.isnan(speedup(records, "suffix", "a"))  # never ran


def test_speedup_pairs_only_prompts_both_ran(records):
    partial = [r for r in records if not (r.method == "ngram" and r.prompt_id == 2)]
    # plain of prompt 2 has no ngram partner: only prompt 1 counts (10 tok/s vs 20 tok/s)
    assert speedup(partial, "ngram", "a") == pytest.approx(2.0)


def test_position_acceptance_and_equivalence(records):
    pos = position_acceptance(r for r in records if r.method == "ngram")
    assert pos == [(13, 15), (10, 13), (2, 5)]
    same, compared, differ = equivalence(records, "ngram")
    assert (same, compared) == (2, 3)
    assert [(r.prompt_id, r.first_divergence) for r in differ] == [(3, 0)]


def _report(records, notes=()) -> str:
    """The report of an ngram run over the records' prompts (category a or b)."""
    prompts = [Prompt(Question(i, c, ("q",)), [1, 2]) for i, c in {r.prompt_id: r.category for r in records}.items()]
    model = {"model": "/x/m.gguf", "family": "llama", "parameters": 1_000_000}
    res = SpecBenchResult({"CPU": "test"}, model, prompts, ["ngram"], {PLAIN: None, "ngram": "ngram"}, 32, 1, 1,
                          None, True, records, notes=list(notes))
    return format_report(res)


def test_format_report(records):
    report = _report(records, notes=["hello"])
    assert report.startswith("## specserve bench spec")
    assert "| CPU | test |" in report and "m.gguf (llama, 1.0M parameters)" in report
    assert "| a | 2.67x |" in report and "| b | 0.50x |" in report
    assert f"**{(40 / 15 + 0.5) / 2:.2f}x**" in report  # macro-average of categories
    assert "| a | 1.00 | 2.67 |" in report  # AL: plain 40/40, ngram 40/15
    assert f"**{60 / 35:.2f}**" in report  # overall AL
    assert "| ngram | 87% | 77% | 40% |" in report  # acceptance per position
    assert "| ngram | 2/3 | 1 | 0 | **lossless** | 0.25 |" in report  # b-3 diverges at a near-tie
    assert "Note: hello." in report


def test_report_flags_a_divergence_that_is_not_a_near_tie(records):
    records[-1].divergence_margin = 2.0
    records.append(rec("ngram", 4, "b", 5, 5, 1.0, ids=[1, 2, 9, 9, 9], plain_ids=[1, 2, 3, 4, 5]))  # margin unknown
    records.append(rec(PLAIN, 4, "b", 5, 5, 1.0))
    report = _report(records)
    assert "| ngram | 2/4 | 0 | 2 | **NOT lossless** | — |" in report
    assert "b-3 (rep 0) at token 0, margin 2" in report and "b-4 (rep 0) at token 2, margin unknown" in report


def test_parse_methods():
    assert parse_methods("ngram, suffix,ngram") == ["ngram", "suffix"]
    assert parse_methods(["layer-skip"]) == ["layer-skip"]
    with pytest.raises(ValueError, match="--methods: unknown method bogus"):
        parse_methods("ngram,bogus")
    with pytest.raises(ValueError, match="--methods"):
        parse_methods(" , ")


def test_filter_categories():
    qs = [Question(1, "a", ("x",)), Question(2, "b", ("y",)), Question(3, "a", ("z",))]
    assert filter_categories(qs, None) == qs
    assert [q.question_id for q in filter_categories(qs, ["a"])] == [1, 3]
    with pytest.raises(ValueError, match="unknown category c"):
        filter_categories(qs, ["a", "c"])


# ---------------------------------------------------------------- the command


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "specserve.cli", "bench", "spec", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)




@pytest.mark.parametrize(
    "args, flag",
    [
        (["--methods", "ngram,bogus"], "--methods"),
        (["--categories", "nope"], "--categories"),
        (["--draft-model", "/nonexistent"], "--draft-model"),
        (["--draft-model", "/tmp", "--draft-layers", "2"], "--draft-layers"),
        (["--num-spec-tokens", "0"], "--num-spec-tokens"),
        (["--n-per-category", "0"], "--n-per-category"),
    ],
)
def test_bad_flags(args, flag, questions_file, tmp_path):
    proc = cli(*args, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and flag in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_tiny_run(questions_file, tmp_path, monkeypatch):
    monkeypatch.setenv(QUESTIONS_ENV, str(questions_file))
    out = tmp_path / "out"
    proc = cli("--methods", "ngram", "--n-per-category", "1", "--max-tokens", "8", "--categories", "writing,coding",
               "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bench spec" in proc.stderr  # the progress bar
    raws = list(out.glob("spec_*.jsonl"))
    assert len(raws) == 1
    rows = [json.loads(line) for line in raws[0].read_text().splitlines()]
    assert [(r["method"], r["category"]) for r in rows] == [
        ("plain", "writing"), ("ngram", "writing"), ("plain", "coding"), ("ngram", "coding")
    ]
    for r in rows:
        assert 1 <= r["new_tokens"] <= 8 and len(r["token_ids"]) == r["new_tokens"]
        assert r["forward_passes"] >= 1 and r["wall_s"] > 0
        for key in ("ttft_s", "drafted_tokens", "accepted_tokens", "accepted_per_position", "drafted_per_position",
                    "draft_time_s", "verify_time_s", "identical_to_plain", "first_divergence", "repetition"):
            assert key in r
    assert all(r["drafted_tokens"] == 0 for r in rows if r["method"] == "plain")
    report = proc.stdout
    assert report == raws[0].with_suffix(".md").read_text()
    assert "## specserve bench spec" in report and "| writing |" in report and "| coding |" in report
    assert "### Acceptance length" in report and "### Equivalence with plain decoding" in report
    for r in rows:
        if r["method"] == "ngram" and r["first_divergence"] is not None:
            assert r["divergence_margin"] is not None  # every divergence is measured, not assumed
    assert "**NOT lossless**" not in report
