"""Pieces shared by the `specserve bench` commands: workload, machine header, raw records, report."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from specserve.bench.workload import Question, filter_categories, load_questions, select_per_category
from specserve.equivalence import NEAR_TIE, first_divergence  # noqa: F401  (re-exported for the benches)
from specserve.model import native
from specserve.sampling.params import SamplingParams

# what `LLM.build_spec` drafts at most per step when no length is given
DEFAULT_DRAFT_LENGTHS = "8 (ngram/suffix), 10 tree nodes (eagle/medusa, alone or after ngram/suffix) or 4 (draft-model/layer-skip)"


@dataclass
class Prompt:
    """One benchmark question as the token ids every engine/method gets."""

    question: Question
    token_ids: list[int]
    turn: int = 1  # 2: the second MT-Bench turn, after the model's own first answer

    @property
    def prompt_id(self) -> str:
        """`writing-81` for a first turn, `writing-81-t2` for a second one."""
        return self.question.prompt_id if self.turn == 1 else f"{self.question.prompt_id}-t{self.turn}"


class PlainMargins:
    """Our plain decoding's top-2 logit margin at a position of its own output.

    Teacher-forced: one untimed forward over the prompt and plain's first `index` tokens,
    so the margin is the one in plain's own context even where a rerun of plain would
    not reproduce it (bf16 numerics depend on how the prompt was chunked or cached).
    A divergence there is a numerical near-tie when the margin is below `tolerance`.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.params = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=2)
        self.tolerance = NEAR_TIE.get(llm.dtype, NEAR_TIE[torch.bfloat16])
        self._cache: dict[tuple[str, tuple[int, ...]], float | None] = {}

    def margin(self, prompt: Prompt, plain_ids: list[int], index: int, plain_setup: Any) -> float | None:
        """The margin at `index` of plain's output (None when plain has no logits there).

        `plain_setup` is the plain-decoding setup (`LLM.build_spec(None)`), put in place first.
        """
        key = (prompt.prompt_id, tuple(plain_ids[:index]))
        if key not in self._cache:
            self.llm.use_spec(plain_setup)
            out = self.llm.generate([list(prompt.token_ids) + list(plain_ids[:index])], self.params)[0]
            top = out.logprobs[0].top if out.logprobs else []
            self._cache[key] = top[0][1] - top[1][1] if len(top) >= 2 else None
        return self._cache[key]


class TimedRecord(Protocol):
    new_tokens: int
    wall_s: float


# ---------------------------------------------------------------- workload


def select_questions(
    questions_path: str | os.PathLike[str] | None, n_per_category: int, categories: Iterable[str] | None = None
) -> list[Question]:
    """The first `n_per_category` questions of every (wanted) category, grouped by category."""
    questions = load_questions(questions_path)
    try:
        questions = filter_categories(questions, categories)
    except ValueError as exc:
        raise ValueError(f"--categories: {exc}") from None
    return select_per_category(questions, n_per_category)


def build_prompts(llm, questions: Sequence[Question]) -> list[Prompt]:
    """First turns through the model's chat template."""
    return [Prompt(q, llm.chat_prompt([{"role": "user", "content": q.turns[0]}])) for q in questions]


def check_fits(prompts: Sequence[Prompt], max_tokens: int, max_model_len: int) -> None:
    longest = max(len(p.token_ids) for p in prompts)
    if longest + max_tokens > max_model_len:
        raise ValueError(
            f"the longest prompt has {longest} tokens: with {max_tokens} new tokens it exceeds "
            f"max_model_len {max_model_len}"
        )


def categories_of(prompts: Sequence[Prompt]) -> list[str]:
    return list(dict.fromkeys(p.question.category for p in prompts))


# ---------------------------------------------------------------- measurements


def machine_info(llm) -> dict[str, str]:
    cpu = native.cpuinfo_field("model name") or platform.processor() or "unknown"
    info = {
        "CPU": cpu,
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "device": str(llm.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
    }
    kv_dtype = getattr(llm, "kv_dtype", None)
    if kv_dtype is not None and kv_dtype != llm.dtype:
        info["KV cache dtype"] = str(kv_dtype).removeprefix("torch.")
    model = getattr(llm, "model", None)
    if model is not None:
        info["decoder layers"] = native.describe(model)  # native (AMX) or pytorch: the numbers differ a lot
    if llm.device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(llm.device)
    return info


def tokens_per_s(records: Iterable[TimedRecord]) -> float:
    """Total new tokens / total wall time (NaN without time)."""
    records = list(records)
    wall = sum(r.wall_s for r in records)
    return sum(r.new_tokens for r in records) / wall if wall > 0 else float("nan")


# ---------------------------------------------------------------- output


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word[:-1] + 'ies' if word.endswith('y') else word + 's'}"


def model_row(model: dict[str, Any]) -> str:
    """`| model | m.gguf (llama, 134.5M parameters) |` from `LLM.info()`."""
    name = os.path.basename(model["model"])
    return f"| model | {name} ({model['family']}, {model['parameters'] / 1e6:.1f}M parameters) |"


def header_table(
    title: str, machine: dict[str, str], model: dict[str, Any], rows: Iterable[tuple[str, str]]
) -> list[str]:
    """The report's opening: a title and a key/value table (machine, model, then `rows`)."""
    lines = [f"## {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines.append(model_row(model))
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def raw_jsonl_path(out_dir: str | os.PathLike[str], prefix: str) -> Path:
    """`OUT/PREFIX_YYYYmmdd-HHMMSS.jsonl` (the directory is created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def write_record(raw: IO[str], record: Any) -> None:
    """One dataclass record as one JSON line, flushed (a crashed run keeps what it measured)."""
    raw.write(json.dumps(asdict(record)) + "\n")
    raw.flush()


def publish_report(report: str, raw_path: Path, stdout: IO[str] | None = None) -> None:
    """The Markdown report next to the raw JSONL (same name, `.md`) and on `stdout`."""
    raw_path.with_suffix(".md").write_text(report, encoding="utf-8")
    stdout = stdout or sys.stdout
    stdout.write(report)
    stdout.flush()
