"""`specserve bench throughput`: argument errors and one tiny real run through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from specserve.bench.common import Prompt
from specserve.bench.oracle import accepted_path
from specserve.bench.throughput import interleave_categories, parse_levels, parse_methods, split_method
from specserve.bench.workload import Question

TIMEOUT = 900  # the shared 2-core machines can be very slow under load


def test_parse_methods_and_levels():
    assert parse_methods("ngram,suffix+load-aware") == ["off", "ngram", "suffix+load-aware"]
    assert parse_methods("suffix,off,ngram,suffix") == ["off", "suffix", "ngram"]
    assert parse_levels("1, 4,16") == [1, 4, 16]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_methods("nope")
    assert parse_methods("ngram+eagle+load-aware,suffix+eagle:/dir") == ["off", "ngram+eagle+load-aware", "suffix+eagle:/dir"]
    with pytest.raises(ValueError, match="pairs with a model drafter"):
        parse_methods("ngram+suffix+load-aware")
    with pytest.raises(ValueError, match="unknown method 'ngram\\+bogus'"):
        parse_methods("ngram+bogus")
    assert parse_methods("ngram@4,oracle:ngram+eagle@10,oracle:suffix") == [
        "off", "ngram@4", "oracle:ngram+eagle@10", "oracle:suffix"
    ]
    assert split_method("oracle:ngram+eagle@10", 8) == ("ngram+eagle", 10, False, True)
    assert split_method("suffix+load-aware", 8) == ("suffix", 8, True, False)
    assert split_method("eagle:/a@b/head", 8) == ("eagle:/a@b/head", 8, False, False)
    for bad, why in (("oracle:ngram+load-aware", "fixed draft length"), ("oracle:off", "fixed draft length"),
                     ("ngram@0", "in \\[1, 32\\]"), ("ngram@33", "in \\[1, 32\\]"), ("oracle:nope@2", "unknown")):
        with pytest.raises(ValueError, match=why):
            parse_methods(bad)
    with pytest.raises(ValueError, match="--concurrency"):
        parse_levels("1,x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_levels("0")


def test_oracle_keeps_the_path_greedy_verification_accepts():
    assert accepted_path([5, 6, 7], None, [5, 6, 9, 9]) == [0, 1]  # a chain: its right prefix
    assert accepted_path([5, 6, 7], None, [6, 6, 7]) == []
    assert accepted_path([5, 6], None, [5, 6]) == [0, 1]
    # a tree: root -> {5 (0), 8 (1)}; 5 -> {6 (2), 7 (3)}; 7 -> {9 (4)}; 8 -> {7 (5)}
    tokens, parents = [5, 8, 6, 7, 9, 7], [-1, -1, 0, 0, 3, 1]
    assert accepted_path(tokens, parents, [5, 7, 9, 1]) == [0, 3, 4]
    assert accepted_path(tokens, parents, [8, 7, 9]) == [1, 5]  # 9 hangs under the other 7
    assert accepted_path(tokens, parents, [7]) == []
    assert accepted_path([], [], [1, 2]) == []


def test_interleave_categories_mixes_every_prefix():
    prompts = [Prompt(Question(i, c, ("q",)), [i]) for i, c in enumerate("aaabbc")]
    order = [(p.question.category, p.question.question_id) for p in interleave_categories(prompts)]
    assert order == [("a", 0), ("b", 3), ("c", 5), ("a", 1), ("b", 4), ("a", 2)]
    assert interleave_categories([]) == []


def test_bad_flag_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "bench", "throughput", "--methods", "warp"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--methods" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_run_writes_report_and_raw_records(tmp_path, questions_file):
    proc = subprocess.run(
        [
            sys.executable, "-m", "specserve.cli", "bench", "throughput", "--methods", "off,ngram+load-aware,oracle:ngram@4",
            "--concurrency", "1,2", "--requests", "4", "--max-tokens", "6", "--repetitions", "2",
            "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| ngram+load-aware |" in proc.stdout and "c=2" in proc.stdout
    # the oracle verifies only drafts on the greedy path: outputs equal off's, rows are upper bounds
    assert re.search(r"\| oracle:ngram@4 \| [\d.]+ \(4/4\) \| [\d.]+ \(4/4\) \|", proc.stdout), proc.stdout
    assert "rows are upper bounds" in proc.stdout
    assert "prefix caching:" in proc.stdout and "peak resident memory" in proc.stdout
    raw = next(tmp_path.glob("throughput_*.jsonl"))
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert {(r["method"], r["concurrency"]) for r in records} == {
        (m, c) for m in ("off", "ngram+load-aware", "oracle:ngram@4") for c in (1, 2)
    }
    assert len(records) == 48 and all(0 < r["new_tokens"] <= 6 for r in records)
    oracle = [r for r in records if r["method"] == "oracle:ngram@4"]
    off = {(r["concurrency"], r["prompt_id"]): r["token_ids"] for r in records if r["method"] == "off"}
    assert all(r["token_ids"] == off[r["concurrency"], r["prompt_id"]] for r in oracle)
    assert all(r["accepted_tokens"] == r["drafted_tokens"] for r in oracle)  # nothing verified is rejected
    # repetitions interleave the methods: off, ngram, off, ngram at each level
    runs = list(dict.fromkeys((r["concurrency"], r["repetition"], r["method"]) for r in records))
    assert runs == [(c, rep, m) for c in (1, 2) for rep in (0, 1) for m in ("off", "ngram+load-aware", "oracle:ngram@4")]
