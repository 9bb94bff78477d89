"""`specserve bench run`: every method, ours and the peers, on the same prepared prompts.

Prompts: Spec-Bench questions through the model's chat template, as token ids that every
method gets unchanged. With `multi_turn`, a question with two turns (MT-Bench) also
gives a second-turn prompt: the first turn, the model's own first answer (our plain
greedy decoding, untimed) and the second turn.

Runs: one warm-up per method, then per repetition every drafter starts fresh, and for
each prompt our plain decoding runs first and then every other method, so machine drift
hits all of them alike. Each request becomes one raw JSONL line (`records.RequestRecord`);
a divergence from our plain output is stored with our plain run's top-2 logit margin at
that position (from an untimed plain run with logprobs), so the report can classify it.
`specserve bench report` turns the JSONL into tables and plots.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from specserve.bench.common import (
    PlainMargins,
    Prompt,
    build_prompts,
    check_fits,
    machine_info,
    raw_jsonl_path,
    select_questions,
    write_record,
)
from specserve.bench.methods import (
    LLAMA_CPP,
    NEEDS_DRAFT_MODEL,
    OURS,
    PEER_METHODS,
    TRANSFORMERS,
    OursRunner,
    llama_cpp_runners,
    missing_peer,
    parse_methods,
    transformers_runners,
)
from specserve.bench.records import PLAIN, Generation, MethodRunner, RequestRecord, RunMeta, write_meta
from specserve.equivalence import first_divergence
from specserve.sampling.params import SamplingParams


@dataclass(frozen=True)
class HarnessConfig:
    methods: tuple[str, ...]
    n_per_category: int = 1
    categories: tuple[str, ...] | None = None
    max_tokens: int = 128
    repetitions: int = 1
    warmup: int = 1
    multi_turn: bool = False
    ignore_eos: bool = False
    num_spec_tokens: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--n-per-category", self.n_per_category, 1),
            ("--max-tokens", self.max_tokens, 1),
            ("--repetitions", self.repetitions, 1),
            ("--warmup", self.warmup, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
        if self.num_spec_tokens is not None and not 1 <= self.num_spec_tokens <= 32:
            raise ValueError(f"--num-spec-tokens must be in [1, 32], got {self.num_spec_tokens}")


# ---------------------------------------------------------------- prompts


def prepare_prompts(llm: Any, questions: Sequence[Any], multi_turn: bool, max_tokens: int) -> list[Prompt]:
    """First turns; with `multi_turn`, each two-turn question's second turn right after its first."""
    prompts: list[Prompt] = []
    answer_params = SamplingParams(max_tokens=max_tokens)  # greedy, EOS respected: the model's own answer
    for first in build_prompts(llm, questions):
        prompts.append(first)
        turns = first.question.turns
        if multi_turn and len(turns) > 1:
            answer = llm.generate([first.token_ids], answer_params)[0].text
            messages = [
                {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": turns[1]},
            ]
            prompts.append(Prompt(first.question, llm.chat_prompt(messages), turn=2))
    return prompts


# ---------------------------------------------------------------- runners


def build_runners(
    llm: Any, config: HarnessConfig, draft_model: str | None, notes: list[str], missing: dict[str, str]
) -> list[MethodRunner]:
    """Runners for the configured methods (plain first); peers that are not installed go to `missing`."""
    runners: list[MethodRunner] = []
    for name in config.methods:
        if name in OURS:
            spec = {PLAIN: None, "draft-model": f"draft-model:{draft_model}"}.get(name, name)
            try:
                runners.append(OursRunner(llm, name, spec, config.num_spec_tokens, config.adaptive))
            except (ValueError, OSError) as exc:
                raise ValueError(f"--methods: {name} cannot be used with this model: {exc}") from None
    peers = {peer: [m for m in config.methods if PEER_METHODS.get(m) == peer] for peer in (TRANSFORMERS, LLAMA_CPP)}
    for peer, names in peers.items():
        if not names:
            continue
        why = missing_peer(names[0])
        if why is not None:
            missing.update({name: why for name in names})
        else:
            runners += _peer_runners(peer, names, llm, draft_model, notes)
    return runners


def _peer_runners(peer: str, names: list[str], llm: Any, draft_model: str | None, notes: list[str]) -> list[MethodRunner]:
    try:
        if peer == TRANSFORMERS:
            return list(transformers_runners(names, llm, draft_model, notes))
        return list(llama_cpp_runners(names, llm))
    except (ValueError, OSError, RuntimeError) as exc:
        raise ValueError(f"--methods: peer {peer} could not load {llm.model_path}: {exc}") from exc


def to_record(runner: MethodRunner, prompt: Prompt, rep: int, gen: Generation) -> RequestRecord:
    q = prompt.question
    return RequestRecord(
        method=runner.name, peer=runner.peer, prompt_id=prompt.prompt_id, category=q.category, turn=prompt.turn,
        repetition=rep, prompt_tokens=len(prompt.token_ids), new_tokens=len(gen.token_ids), wall_s=gen.wall_s,
        ttft_s=gen.ttft_s, forward_passes=gen.forward_passes, drafted_tokens=gen.drafted_tokens,
        accepted_tokens=gen.accepted_tokens, accepted_per_position=gen.accepted_per_position,
        drafted_per_position=gen.drafted_per_position, finish_reason=gen.finish_reason, token_ids=gen.token_ids,
    )


def run_requests(
    runners: Sequence[MethodRunner], prompts: Sequence[Prompt], config: HarnessConfig, margins: PlainMargins, raw: IO[str]
) -> list[RequestRecord]:
    """Warm-up, then the timed repetitions; every record is written to `raw` as it is made."""
    plain = runners[0]
    assert plain.name == PLAIN and isinstance(plain, OursRunner)
    total = len(runners) * (config.warmup + config.repetitions * len(prompts))
    records: list[RequestRecord] = []
    with tqdm(total=total, desc="bench run", file=sys.stderr) as bar:
        for runner in runners:
            bar.set_postfix_str(f"{runner.name} warm-up")
            for _ in range(config.warmup):
                runner.generate(prompts[0].token_ids, config.max_tokens, config.ignore_eos)
                bar.update()
        for rep in range(config.repetitions):
            for runner in runners:
                runner.reset()  # no prompt is drafted from its own earlier output
            for i, prompt in enumerate(prompts):
                plain_ids: list[int] = []
                for runner in runners:
                    bar.set_postfix_str(f"rep {rep + 1} prompt {i + 1}/{len(prompts)} {runner.name}")
                    rec = to_record(runner, prompt, rep, runner.generate(prompt.token_ids, config.max_tokens, config.ignore_eos))
                    if runner is plain:
                        plain_ids = rec.token_ids
                    else:
                        rec.first_divergence = first_divergence(plain_ids, rec.token_ids)
                        rec.near_tie_tolerance = margins.tolerance
                        if rec.first_divergence is not None:
                            rec.divergence_margin = margins.margin(prompt, plain_ids, rec.first_divergence, plain.setup)
                    records.append(rec)
                    write_record(raw, rec)
                    bar.update()
    return records


# ---------------------------------------------------------------- the run


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """`abc1234` (`+dirty` with uncommitted changes), or `unknown` outside a git checkout."""
    where = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_harness(
    config: HarnessConfig,
    model: str | None = None,
    dtype: str | None = None,
    draft_model: str | None = None,
    draft_layers: int | None = None,
    out_dir: str | os.PathLike[str] = "bench_out",
    questions_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Run every configured method; returns the raw JSONL path (its `.meta.json` next to it)."""
    from specserve.api import LLM
    from specserve.bench.spec import resolve_draft_model

    if draft_model is not None and draft_layers is not None:
        raise ValueError("--draft-model and --draft-layers exclude each other")
    if draft_model is not None and not os.path.exists(draft_model):
        raise FileNotFoundError(f"--draft-model: path does not exist: {draft_model}")
    questions = select_questions(questions_path, config.n_per_category, config.categories)
    notes: list[str] = []
    missing: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        llm = LLM(model, dtype=dtype)
        prompts = prepare_prompts(llm, questions, config.multi_turn, config.max_tokens)
        check_fits(prompts, config.max_tokens, llm.max_model_len)
        draft_desc = None
        if any(m in NEEDS_DRAFT_MODEL for m in config.methods):
            draft_model, draft_desc = resolve_draft_model(llm, draft_model, draft_layers, stack)
        runners = build_runners(llm, config, draft_model, notes, missing)
        raw_path = raw_jsonl_path(out_dir, "harness")
        meta = RunMeta(
            machine={**machine_info(llm), "commit": git_commit()},
            model=llm.info(),
            config={**asdict(config), "draft_model": draft_desc, "prompts": len(prompts)},
            methods=[r.name for r in runners],
            notes=notes,
            missing_peers=missing,
        )
        write_meta(raw_path, meta)
        with open(raw_path, "w", encoding="utf-8") as raw:
            run_requests(runners, prompts, config, PlainMargins(llm), raw)
        llm.set_spec(None)
    return raw_path


def harness_config(methods: str | Iterable[str], categories: Iterable[str] | None = None, **kwargs: Any) -> HarnessConfig:
    """A validated config from CLI-shaped values (errors name the flag)."""
    cats = tuple(categories) if categories is not None else None
    return HarnessConfig(methods=tuple(parse_methods(methods)), categories=cats, **kwargs)
