"""Method runners for the harness: specserve's own methods and the peers.

Every runner follows `records.MethodRunner`: same prompt token ids in, a `Generation`
out, greedy, at most `max_tokens` new tokens, stopping at the model's EOS ids unless
`ignore_eos` (the same EOS set for every method: the target's, as specserve reads it).

Ours: `plain`, `ngram`, `suffix`, `draft-model`, `layer-skip`, `eagle`, `medusa` (the packaged heads),
`ngram+eagle`, `suffix+eagle` (copy where the context repeats, the EAGLE head otherwise). Peers, each on the same
model file: `transformers`, `transformers+prompt-lookup`, `transformers+assisted`
(`assistant_model` = our draft model), `llama.cpp`, `llama.cpp+prompt-lookup`
(`LlamaPromptLookupDecoding`). Peers are optional: a peer whose package is missing is
skipped with a note, never an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from specserve.bench.records import PLAIN, Generation
from specserve.sampling.params import SamplingParams

OURS = (PLAIN, "ngram", "suffix", "draft-model", "layer-skip", "eagle", "medusa", "ngram+eagle", "suffix+eagle")
TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"
PEER_METHODS: dict[str, str] = {  # method -> peer
    TRANSFORMERS: TRANSFORMERS,
    "transformers+prompt-lookup": TRANSFORMERS,
    "transformers+assisted": TRANSFORMERS,
    LLAMA_CPP: LLAMA_CPP,
    "llama.cpp+prompt-lookup": LLAMA_CPP,
}
ALL_METHODS = (*OURS, *PEER_METHODS)
PEER_MODULES = {TRANSFORMERS: "transformers", LLAMA_CPP: "llama_cpp"}
PEER_INSTALL = {
    TRANSFORMERS: "pip install 'specserve[peers]' (or: pip install transformers accelerate)",
    LLAMA_CPP: "pip install 'specserve[peers]' (or: pip install llama-cpp-python==0.3.36)",
}
PEER_DRAFT_TOKENS = 10  # the peers' own prompt-lookup default (transformers' docs, LlamaPromptLookupDecoding)
LLAMA_CPP_THREADS = 2
NEEDS_DRAFT_MODEL = ("draft-model", "transformers+assisted")


def parse_method_list(text: str | Iterable[str], known: Sequence[str]) -> list[str]:
    """`"a, b,a"` -> `["a", "b"]`: names from `known`, no duplicates, at least one (errors name --methods)."""
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text)]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"--methods: give at least one of {', '.join(known)}")
    unknown = [m for m in items if m not in known]
    if unknown:
        raise ValueError(f"--methods: unknown method {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def parse_methods(text: str | Iterable[str]) -> list[str]:
    """`"ngram,llama.cpp"` -> `["plain", "ngram", "llama.cpp"]`: known names, plain always first."""
    items = parse_method_list(text, ALL_METHODS)
    return list(dict.fromkeys([PLAIN, *items]))


def missing_peer(method: str) -> str | None:
    """None when `method` can run here, else the report's "peer X not installed: pip install ..." line."""
    peer = PEER_METHODS.get(method)
    if peer is None or importlib.util.find_spec(PEER_MODULES[peer]) is not None:
        return None
    return f"peer {peer} not installed: {PEER_INSTALL[peer]}"


# ---------------------------------------------------------------- step accounting


@dataclass
class StepLog:
    """Target forwards and the tokens each one emitted, as a peer's hooks see them.

    Forward k gets `n_inputs` tokens: the prompt (k = 0 only), the last token and the
    drafts. The tokens emitted after it are the accepted drafts plus one (bonus or
    recovered), so drafted/accepted counts per position follow without peer internals.
    """

    prompt_tokens: int
    started: float = field(default_factory=time.perf_counter)
    inputs: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    first_token_time: float | None = None

    def forward(self, n_inputs: int) -> None:
        self.inputs.append(n_inputs)
        self.emitted.append(0)

    def emit(self, n_tokens: int) -> None:
        if n_tokens and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.emitted:
            self.emitted[-1] += n_tokens

    def generation(self, token_ids: list[int], finish_reason: str, ends: float) -> Generation:
        drafted = [n - (self.prompt_tokens if k == 0 else 1) for k, n in enumerate(self.inputs)]
        acc_pos: list[int] = [0] * max(drafted, default=0)
        dra_pos: list[int] = [0] * max(drafted, default=0)
        accepted_total = 0
        for d, e in zip(drafted, self.emitted):
            accepted = min(max(e - 1, 0), d)
            accepted_total += accepted
            for j in range(d):
                dra_pos[j] += 1
                acc_pos[j] += j < accepted
        ttft = None if self.first_token_time is None else self.first_token_time - self.started
        return Generation(
            token_ids=token_ids,
            wall_s=ends - self.started,
            ttft_s=ttft,
            forward_passes=len(self.inputs),
            drafted_tokens=sum(drafted),
            accepted_tokens=accepted_total,
            accepted_per_position=acc_pos,
            drafted_per_position=dra_pos,
            finish_reason=finish_reason,
        )


def finish_reason(token_ids: list[int], max_tokens: int) -> str:
    return "length" if len(token_ids) >= max_tokens else "stop"


# ---------------------------------------------------------------- ours


class OursRunner:
    """specserve with one speculative method (`spec` None = plain decoding) on a loaded `LLM`."""

    peer: str | None = None

    def __init__(self, llm: Any, name: str, spec: str | None, num_spec_tokens: int | None, adaptive: bool) -> None:
        self.llm, self.name, self.spec = llm, name, spec
        self.num_spec_tokens = num_spec_tokens if spec is not None else None
        self.adaptive = adaptive
        self.reset()

    def reset(self) -> None:
        self.setup = self.llm.build_spec(self.spec, self.num_spec_tokens, self.adaptive)

    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> Generation:
        self.llm.use_spec(self.setup)
        self.llm.reset_prefix_cache()  # every method prefills the whole prompt (as llama.cpp's runner does)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)  # greedy
        started = time.perf_counter()
        out = self.llm.generate([prompt_ids], params)[0]
        wall = time.perf_counter() - started
        m = out.metrics
        spec = self.spec is not None
        return Generation(
            token_ids=list(out.token_ids),
            wall_s=wall,
            ttft_s=m.ttft,
            forward_passes=m.forward_passes,
            drafted_tokens=m.drafted_tokens,
            accepted_tokens=m.accepted_tokens,
            accepted_per_position=list(m.accepted_per_position) if spec else None,
            drafted_per_position=list(m.drafted_per_position) if spec else None,
            finish_reason=out.finish_reason,
        )


# ---------------------------------------------------------------- transformers


class TransformersRunner:
    """`model.generate` of transformers, greedy; `generate_kwargs` picks prompt lookup / an assistant."""

    peer = TRANSFORMERS

    def __init__(self, name: str, model: Any, eos_ids: list[int], generate_kwargs: dict[str, Any]) -> None:
        import torch

        self.name, self.model, self.eos_ids, self.kwargs = name, model, eos_ids, generate_kwargs
        self.device = next(model.parameters()).device
        self.log: StepLog | None = None
        self._torch = torch
        model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, _module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.log is not None and ids is not None:
            self.log.forward(int(ids.shape[-1]))

    def reset(self) -> None:
        pass  # prompt lookup and the assistant keep no state across requests

    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> Generation:
        torch = self._torch
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        self.log = log = StepLog(len(prompt_ids))
        streamer = _CountingStreamer(log)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else None,
                eos_token_id=self.eos_ids,
                pad_token_id=self.eos_ids[0],
                streamer=streamer,
                **self.kwargs,
            )
            new = out[0, len(prompt_ids) :].tolist()  # host copy inside the timed region
        ends = time.perf_counter()
        self.log = None
        return log.generation(new, finish_reason(new, max_tokens), ends)


class _CountingStreamer:
    """A transformers streamer that only counts: the first `put` is the prompt, later ones new tokens."""

    def __init__(self, log: StepLog) -> None:
        self.log, self.seen_prompt = log, False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.log.emit(int(value.numel()))

    def end(self) -> None:
        pass


def transformers_runners(
    names: list[str], llm: Any, draft_model: str | None, notes: list[str]
) -> list[TransformersRunner]:
    """The wanted transformers methods on transformers' own load of the target file (same dtype)."""
    from specserve.bench.plain import load_transformers_model

    model, load_notes = load_transformers_model(llm.model_path, llm.dtype, llm.device)
    notes += load_notes
    eos = sorted(llm.tokenizer.eos_token_ids)
    runners = []
    for name in names:
        kwargs: dict[str, Any] = {}
        if name == "transformers+prompt-lookup":
            kwargs["prompt_lookup_num_tokens"] = PEER_DRAFT_TOKENS
        elif name == "transformers+assisted":
            assistant, assistant_notes = load_transformers_model(draft_model, llm.dtype, llm.device)
            notes += [f"assistant model: {n}" for n in assistant_notes]
            kwargs["assistant_model"] = assistant
        runners.append(TransformersRunner(name, model, eos, kwargs))
    return runners


# ---------------------------------------------------------------- llama.cpp


class LlamaCppRunner:
    """llama-cpp-python on the target's GGUF file, greedy (top_k=1, temp 0), 2 threads."""

    peer = LLAMA_CPP

    def __init__(self, name: str, gguf_path: str, n_ctx: int, eos_ids: list[int], prompt_lookup: bool) -> None:
        self.name, self.eos_ids = name, set(eos_ids)
        self.model = _counting_llama(gguf_path, n_ctx, prompt_lookup)

    def reset(self) -> None:
        pass  # LlamaPromptLookupDecoding keeps no state across requests

    def generate(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> Generation:
        model = self.model
        model.reset()  # no prefix reuse from the previous request: every method prefills the whole prompt
        model.step_log = log = StepLog(len(prompt_ids))
        new: list[int] = []
        reason = "length"
        for token in model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token in self.eos_ids and not ignore_eos:
                reason = "stop"
                break
            new.append(int(token))
            log.emit(1)
            if len(new) >= max_tokens:
                break
        ends = time.perf_counter()
        model.step_log = None
        return log.generation(new, reason, ends)


def _counting_llama(gguf_path: str, n_ctx: int, prompt_lookup: bool) -> Any:
    """A `llama_cpp.Llama` whose `eval` calls (one target forward each) are logged."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    class CountingLlama(Llama):
        step_log: StepLog | None = None

        def eval(self, tokens) -> None:
            if self.step_log is not None:
                self.step_log.forward(len(tokens))
            super().eval(tokens)

    draft = LlamaPromptLookupDecoding(num_pred_tokens=PEER_DRAFT_TOKENS) if prompt_lookup else None
    # With a draft model llama-cpp-python keeps logits of every position but sizes its score buffer
    # by `logits_all`: without logits_all=True a prompt longer than n_batch (512) overflows it.
    with _without_extra_buffer_types():
        return CountingLlama(
            model_path=gguf_path, n_ctx=n_ctx, n_threads=LLAMA_CPP_THREADS, n_threads_batch=LLAMA_CPP_THREADS,
            draft_model=draft, logits_all=prompt_lookup, verbose=False,
        )


@contextlib.contextmanager
def _without_extra_buffer_types():
    """Load llama.cpp models with `use_extra_bufts = False` (llama-cpp-python's `Llama` has no argument for it).

    On CPUs with AMX, ggml (as built by llama-cpp-python 0.3.36) puts Q4_1 weights in its AMX buffer type,
    and its AMX matmul crashes the process with a segmentation fault on the first decode (seen on a
    Xeon with amx_bf16/amx_int8). Without extra buffer types ggml runs its regular AVX-512 kernels.
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama_cpp_runners(names: list[str], llm: Any) -> list[LlamaCppRunner]:
    if not str(llm.model_path).endswith(".gguf"):
        raise ValueError(f"--methods: llama.cpp needs a GGUF target, got {llm.model_path}")
    eos = sorted(llm.tokenizer.eos_token_ids)
    return [
        LlamaCppRunner(name, llm.model_path, llm.max_model_len, eos, name.endswith("+prompt-lookup")) for name in names
    ]
