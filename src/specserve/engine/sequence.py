"""Per-request state: tokens, sampling, text stream, metrics."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from specserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from specserve.sampling.params import SamplingParams
from specserve.sampling.sampler import make_generator


class Status(enum.Enum):
    WAITING = "waiting"  # not yet in the KV cache
    PREFILL = "prefill"  # prompt partly in the KV cache
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Timings and counts of one request (seconds from `time.perf_counter`)."""

    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0  # target forwards that produced tokens for this request
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    draft_time: float = 0.0
    verify_time: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    preemptions: int = 0  # times the request left the batch to free KV memory

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens after the first, per second of decoding."""
        if self.finish_time is None or self.first_token_time is None or self.generated_tokens < 2:
            return None
        span = self.finish_time - self.first_token_time
        return (self.generated_tokens - 1) / span if span > 0 else None

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per target forward during decoding (plain decoding = 1.0)."""
        return self.generated_tokens / self.forward_passes if self.forward_passes else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    def as_dict(self) -> dict[str, float | int | list[int] | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": self.ttft,
            "latency_s": self.latency,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "forward_passes": self.forward_passes,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_length": self.acceptance_length,
            "acceptance_rate": self.acceptance_rate,
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
            "draft_time_s": self.draft_time,
            "verify_time_s": self.verify_time,
            "cached_tokens": self.cached_tokens,
            "preemptions": self.preemptions,
        }


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    """One request inside the engine."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer, device) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.slot: int | None = None
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = make_generator(params.seed, device)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=self.prompt_ids) if tokenizer else None
        self.stops = StopStringMatcher(params.stop)
        self.text = ""  # text emitted so far
        self.pending_delta = ""  # emitted text not yet taken by a stream consumer
        self.logprobs: list[TokenLogprob] = []
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids))

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def take_delta(self) -> str:
        delta, self.pending_delta = self.pending_delta, ""
        return delta
