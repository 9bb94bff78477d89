"""The harness's runner contract: what every method (ours or a peer) yields per request.

A method runner takes prepared prompt token ids and returns a `Generation`; the harness
turns it into a `RequestRecord` (one raw JSONL line). A run's configuration, machine
info and notes (e.g. a peer that is not installed) go to a `RUN.meta.json` next to the
`RUN.jsonl`, so `specserve bench report` needs nothing but those files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

PLAIN = "plain"  # our plain decoding: the baseline of every speedup and equivalence check


@dataclass
class Generation:
    """What one method produced for one prompt."""

    token_ids: list[int]
    wall_s: float  # the whole request, prefill included
    ttft_s: float | None
    forward_passes: int  # target forwards (prefill included; plain decoding: one per token)
    drafted_tokens: int | None = None  # None: the method cannot tell
    accepted_tokens: int | None = None
    accepted_per_position: list[int] | None = None
    drafted_per_position: list[int] | None = None
    finish_reason: str | None = None


class MethodRunner(Protocol):
    """One method, ours or a peer, ready to run (model loaded, drafter built)."""

    name: str
    peer: str | None  # None for specserve's own methods; else the peer's name (e.g. "transformers")

    def reset(self) -> None:
        """Forget drafter state learnt from earlier requests (start of a repetition)."""

    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> Generation:
        """Greedy completion of `prompt_ids`, at most `max_tokens` new tokens."""


@dataclass
class RequestRecord:
    """One timed request: one line of the raw JSONL."""

    method: str
    peer: str | None
    prompt_id: str  # "writing-81" (first turn) / "writing-81-t2" (second turn)
    category: str
    turn: int
    repetition: int
    prompt_tokens: int
    new_tokens: int
    wall_s: float
    ttft_s: float | None
    forward_passes: int
    drafted_tokens: int | None
    accepted_tokens: int | None
    accepted_per_position: list[int] | None
    drafted_per_position: list[int] | None
    finish_reason: str | None
    token_ids: list[int]
    # against our plain decoding of the same prompt and repetition
    first_divergence: int | None = None  # None: identical (or this is plain)
    divergence_margin: float | None = None  # plain's top-2 logit margin there (None: unknown)
    near_tie_tolerance: float | None = None

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class RunMeta:
    """A run's configuration and context (the `.meta.json` next to the JSONL)."""

    machine: dict[str, str]
    model: dict[str, Any]
    config: dict[str, Any]
    methods: list[str]
    notes: list[str] = field(default_factory=list)
    missing_peers: dict[str, str] = field(default_factory=dict)  # method -> "peer X not installed: pip install ..."


def meta_path(jsonl: str | os.PathLike[str]) -> Path:
    return Path(jsonl).with_suffix(".meta.json")


def write_meta(jsonl: str | os.PathLike[str], meta: RunMeta) -> None:
    meta_path(jsonl).write_text(json.dumps(asdict(meta), indent=1) + "\n", encoding="utf-8")


def read_meta(jsonl: str | os.PathLike[str]) -> RunMeta | None:
    path = meta_path(jsonl)
    if not path.is_file():
        return None
    return RunMeta(**json.loads(path.read_text(encoding="utf-8")))


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None


def read_records(paths: Iterable[str | os.PathLike[str]]) -> list[RequestRecord]:
    records = []
    for path in paths:
        for row in iter_jsonl(path):
            try:
                records.append(RequestRecord.from_dict(row))
            except TypeError as exc:
                raise ValueError(f"{path}: not a harness record ({exc})") from None
    return records
