"""Benchmark workloads: the Spec-Bench questions (`shared/bench/spec_bench_questions.jsonl`).

The file is evaluation data (see its README): read it, never tune anything on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

QUESTIONS_ENV = "SPECSERVE_BENCH_QUESTIONS"
QUESTIONS_RELPATH = Path("shared") / "bench" / "spec_bench_questions.jsonl"


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def prompt_id(self) -> str:
        return f"{self.category}-{self.question_id}"


def _candidates(start: Path) -> Iterable[Path]:
    for directory in (start, *start.parents):
        yield directory / QUESTIONS_RELPATH
        yield directory.parent / QUESTIONS_RELPATH  # `../shared/bench/...` next to a checkout


def find_questions_file(
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    package_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Where the Spec-Bench questions are.

    `$SPECSERVE_BENCH_QUESTIONS` when set; else the first `shared/bench/spec_bench_questions.jsonl`
    or `../shared/bench/...` found walking up from the current directory, then from this package.
    """
    env = os.environ if env is None else env
    explicit = env.get(QUESTIONS_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${QUESTIONS_ENV} points at {path}, which is not a file")
        return path
    starts = [
        Path(cwd if cwd is not None else os.getcwd()).resolve(),
        Path(package_dir if package_dir is not None else Path(__file__).parent).resolve(),
    ]
    for start in starts:
        for candidate in _candidates(start):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"Spec-Bench questions not found: looked for {QUESTIONS_RELPATH} and ../{QUESTIONS_RELPATH} above "
        f"{' and '.join(str(s) for s in starts)}; set ${QUESTIONS_ENV} to the file"
    )


def load_questions(path: str | os.PathLike[str] | None = None) -> list[Question]:
    """Every question of the file, in file order."""
    path = Path(path) if path is not None else find_questions_file()
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise ValueError("'turns' must be a non-empty list of strings")
                questions.append(Question(int(row["question_id"]), str(row["category"]), tuple(turns)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Spec-Bench question ({exc})") from exc
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def categories(questions: list[Question]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions))


def select_per_category(questions: list[Question], n_per_category: int) -> list[Question]:
    """The first `n_per_category` questions of every category, grouped by category."""
    if not isinstance(n_per_category, int) or n_per_category < 1:
        raise ValueError(f"n_per_category must be an int >= 1, got {n_per_category!r}")
    return [q for cat in categories(questions) for q in [q for q in questions if q.category == cat][:n_per_category]]


def filter_categories(questions: list[Question], wanted: Iterable[str] | None) -> list[Question]:
    """Only the questions of the `wanted` categories (None or empty: all); unknown names are an error."""
    wanted = [c for c in (wanted or []) if c]
    if not wanted:
        return list(questions)
    known = categories(questions)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        noun = "category" if len(unknown) == 1 else "categories"
        raise ValueError(f"unknown {noun} {', '.join(unknown)}; choose from {', '.join(known)}")
    keep = set(wanted)
    return [q for q in questions if q.category in keep]
