"""`specserve bench forward`: argument errors and one tiny real run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specserve.bench.forward import parse_ints, parse_paths
from specserve.model import native

TIMEOUT = 900  # the shared 2-core machines can be very slow under load


def test_parse_lists():
    assert parse_ints("16, 1,4,4", "--seqs") == [1, 4, 16]
    assert parse_paths("pytorch,native,pytorch") == ["pytorch", "native"]
    with pytest.raises(ValueError, match="--seqs"):
        parse_ints("1,x", "--seqs")
    with pytest.raises(ValueError, match=">= 1"):
        parse_ints("0", "--tokens")
    with pytest.raises(ValueError, match="--paths"):
        parse_paths("native,cuda")


@pytest.mark.parametrize("flag,value", [("--paths", "warp"), ("--contexts", "-3"), ("--seqs", "1000")])
def test_bad_flag_is_one_line(flag, value):
    proc = subprocess.run(
        [sys.executable, "-m", "specserve.cli", "bench", "forward", flag, value],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and flag in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_run_writes_report_and_raw_records(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "specserve.cli", "bench", "forward", "--contexts", "20", "--seqs", "1,2",
            "--tokens", "1,3", "--repetitions", "1", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "### 20 cached tokens per sequence" in proc.stdout and "| 2 | " in proc.stdout
    raw = next(tmp_path.glob("forward_*.jsonl"))
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    paths = ["native", "pytorch"] if native.library() is not None else ["pytorch"]
    if native.library() is None:
        assert "native skipped" in proc.stdout  # named, not silently dropped
    assert sorted({r["path"] for r in records}) == sorted(paths)
    assert len(records) == len(paths) * 4
    assert all(r["best_ms"] > 0 and r["median_ms"] >= r["best_ms"] for r in records)
