"""`specserve bench report`: tables, equivalence classification, notes and plots from hand-made JSONL."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from specserve.bench import plots, report
from specserve.bench.methods import StepLog, missing_peer, parse_methods
from specserve.bench.records import PLAIN, RequestRecord, RunMeta, read_records, write_meta

TOL = 0.5


def rec(method, prompt_id, category, ids, wall, forwards=None, *, rep=0, peer=None, margin=None, acc=None, dra=None):
    plain_like = forwards is None
    return RequestRecord(
        method=method, peer=peer, prompt_id=prompt_id, category=category, turn=1, repetition=rep, prompt_tokens=10,
        new_tokens=len(ids), wall_s=wall, ttft_s=0.05, forward_passes=len(ids) if plain_like else forwards,
        drafted_tokens=None if dra is None else sum(dra), accepted_tokens=None if acc is None else sum(acc),
        accepted_per_position=acc, drafted_per_position=dra, finish_reason="stop", token_ids=list(ids),
        near_tie_tolerance=TOL, divergence_margin=margin,
        first_divergence=None if method == PLAIN else _div(ids),
    )


def _div(ids):
    base = list(range(len(ids)))
    return next((i for i, (a, b) in enumerate(zip(base, ids)) if a != b), None)


def records():
    ten, twenty = list(range(10)), list(range(20))
    return [
        rec(PLAIN, "writing-1", "writing", ten, 1.0),
        rec("ngram", "writing-1", "writing", ten, 0.5, 5, acc=[3, 2], dra=[5, 3]),
        rec(PLAIN, "rag-2", "rag", twenty, 2.0),
        rec("ngram", "rag-2", "rag", twenty[:5] + [99] * 15, 1.0, 10, margin=0.1),  # near-tie divergence
        rec("suffix", "writing-1", "writing", ten, 0.4, 4),
        rec("suffix", "rag-2", "rag", twenty[:3] + [99] * 17, 1.0, 10, margin=2.0),  # NOT a near-tie
        rec("llama.cpp", "writing-1", "writing", ten[:2] + [5] * 8, 0.25, 10, peer="llama.cpp", margin=3.0),
        rec("llama.cpp", "rag-2", "rag", twenty, 0.5, 20, peer="llama.cpp"),
    ]


@pytest.fixture
def run_files(tmp_path):
    raw = tmp_path / "harness_x.jsonl"
    raw.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records()))
    meta = RunMeta(
        machine={"CPU": "test cpu", "torch": "2.x", "commit": "abc"},
        model={"model": "/m/SmolLM2.gguf", "family": "llama"},
        config={"max_tokens": 20, "repetitions": 1, "warmup": 0, "prompts": 2, "ignore_eos": False},
        methods=["plain", "ngram", "suffix", "llama.cpp", "transformers"],
        missing_peers={"transformers": "peer transformers not installed: pip install 'specserve[peers]'"},
    )
    write_meta(raw, meta)
    tp = tmp_path / "throughput_x.jsonl"
    rows = [
        {"method": m, "concurrency": c, "repetition": 0, "new_tokens": 10, "level_wall_s": 1.0 / c}
        for m in ("off", "ngram") for c in (1, 2)
    ]
    tp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw, tp


def test_maths():
    recs = records()
    # plain: 30 tokens in 3 s; ngram: 30 in 1.5 s; llama.cpp: 30 in 0.75 s (pooled over both prompts)
    assert report.speedup(recs, "ngram", PLAIN) == pytest.approx(2.0)
    assert report.speedup(recs, "ngram", "llama.cpp") == pytest.approx(0.5)
    assert report.acceptance_length(r for r in recs if r.method == "ngram") == pytest.approx(30 / 15)
    assert report.position_acceptance(r for r in recs if r.method == "ngram") == [pytest.approx(0.6), pytest.approx(2 / 3)]
    assert math.isnan(report.speedup(recs, "layer-skip", PLAIN))


def test_equivalence_classification():
    recs = records()
    ngram = report.equivalence(recs, "ngram")
    assert (ngram.compared, ngram.identical, ngram.near_ties, ngram.lossless) == (2, 1, 1, True)
    suffix = report.equivalence(recs, "suffix")
    assert not suffix.lossless and "rag-2 (rep 0) at token 3, margin 2" in suffix.not_near_ties[0]
    # a margin recorded for another position than the real first divergence is not trusted
    stale = [*recs[:3], rec("ngram", "rag-2", "rag", list(range(5)) + [99] * 15, 1.0, 10, margin=0.1)]
    stale[-1].first_divergence = 7
    assert not report.equivalence(stale, "ngram").lossless


def test_report_tables_notes_and_plots(run_files, tmp_path):
    raw, tp = run_files
    out = tmp_path / "rep" / "report.md"
    text = report.write_report([raw], out, [tp])
    assert out.read_text() == text
    assert "| CPU | test cpu |" in text and "| commit | abc |" in text
    assert "peer transformers not installed: pip install 'specserve[peers]'" in text
    assert "| writing | 1.00x | 2.00x |" in text  # speedup matrix: plain, ngram, ...
    assert "| ngram | 1/2 | 1 | 0 | **lossless** |" in text
    assert "| suffix | 1/2 | 0 | 1 | **NOT lossless** |" in text
    assert "| llama.cpp | 1/2 | 0 | 1 | for information (other kernels) |" in text
    assert "vs llama.cpp" in text and "| ngram | 60% | 67% |" in text
    assert "| off | 10.0 | 20.0 |" in text  # throughput per level
    if plots.available():
        for name in ("speedup_per_category.png", "acceptance_length.png", "throughput_vs_concurrency.png"):
            assert (out.parent / "img" / name).stat().st_size > 1000
        assert "![speedup per category](img/speedup_per_category.png)" in text


def test_report_says_when_matplotlib_is_missing(run_files, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    text = report.write_report([run_files[0]], tmp_path / "r.md")
    assert report.MATPLOTLIB_MISSING in text and not (tmp_path / "img").exists()


def test_records_roundtrip_and_bad_file(run_files, tmp_path):
    assert [r.method for r in read_records([run_files[0]])][:2] == [PLAIN, "ngram"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"method": "plain"}\n')
    with pytest.raises(ValueError, match="not a harness record"):
        read_records([bad])


def test_report_cli(run_files, tmp_path):
    raw, tp = run_files
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "bench", "report", str(raw), "--throughput", str(tp),
         "--out", str(tmp_path / "cli.md")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "### Overall" in proc.stdout and (tmp_path / "cli.md").is_file()
    proc = subprocess.run([sys.executable, "-m", "specserve.cli", "bench", "report", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a file" in proc.stderr


def test_parse_methods_and_missing_peer(monkeypatch):
    assert parse_methods("ngram, llama.cpp") == [PLAIN, "ngram", "llama.cpp"]
    with pytest.raises(ValueError, match="--methods: unknown method warp"):
        parse_methods("warp")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert missing_peer("llama.cpp+prompt-lookup").startswith("peer llama.cpp not installed: pip install")
    assert missing_peer("ngram") is None


def test_step_log_counts_drafts_per_position():
    log = StepLog(prompt_tokens=5)
    log.forward(5)  # prefill
    log.emit(1)
    log.forward(4)  # last token + 3 drafts: 2 accepted + 1 bonus/recovered
    log.emit(3)
    log.forward(3)  # 2 drafts, none accepted
    log.emit(1)
    gen = log.generation(list(range(5)), "length", ends=log.started + 1.0)
    assert (gen.forward_passes, gen.drafted_tokens, gen.accepted_tokens) == (3, 5, 2)
    assert gen.drafted_per_position == [2, 2, 1] and gen.accepted_per_position == [1, 1, 0]
    assert gen.wall_s == pytest.approx(1.0) and gen.ttft_s is not None


def test_meta_is_optional(run_files, tmp_path):
    raw = tmp_path / "plain_only.jsonl"
    raw.write_text(Path(run_files[0]).read_text())
    text = report.write_report([raw], tmp_path / "m.md")
    assert "machine and configuration unknown" in text
