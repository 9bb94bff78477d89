"""Per-request sampling parameters (OpenAI / vLLM compatible semantics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specserve.validation import is_int, require_float, require_int

#: Largest number of top logprobs a request may ask for (OpenAI's limit).
MAX_LOGPROBS = 20
#: OpenAI's allowed range for presence / frequency penalties.
PENALTY_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    Semantics follow the OpenAI API and vLLM:

    * ``temperature == 0`` means greedy decoding (see :attr:`greedy`).
    * ``top_k`` of 0 or -1 disables top-k; ``top_p == 1`` disables nucleus
      sampling; ``min_p == 0`` disables min-p.
    * ``repetition_penalty`` (HF semantics) applies to tokens seen in the
      prompt or the output; ``presence_penalty`` / ``frequency_penalty``
      (OpenAI semantics) apply to tokens seen in the output only.
    * ``stop`` may be given as a single string or any sequence of strings and
      is normalised to a tuple; ``stop_token_ids`` likewise.
    * ``logprobs`` is the number of top alternatives to return per token
      (``None`` = do not return logprobs, 0 = only the chosen token's).

    Every field is validated in ``__post_init__``; an invalid value raises
    :class:`ValueError` naming the field and the offending value.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # the dataclass is frozen

        max_tokens = require_int("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        set_(self, "max_tokens", max_tokens)

        temperature = require_float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        set_(self, "temperature", temperature)

        top_p = require_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_(self, "top_p", top_p)

        top_k = require_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        set_(self, "top_k", top_k)

        min_p = require_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        set_(self, "min_p", min_p)

        repetition_penalty = require_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"
            )
        set_(self, "repetition_penalty", repetition_penalty)

        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            raw = getattr(self, name)
            value = require_float(name, raw)
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {raw!r}")
            set_(self, name, value)

        if self.seed is not None:
            seed = require_int("seed", self.seed)
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed!r}")
            set_(self, "seed", seed)

        set_(self, "stop", self._normalize_stop(self.stop))
        set_(self, "stop_token_ids", self._normalize_stop_token_ids(self.stop_token_ids))

        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

        if self.logprobs is not None:
            logprobs = require_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}"
                )
            set_(self, "logprobs", logprobs)

    @staticmethod
    def _normalize_stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
        for item in stop:
            if not isinstance(item, str):
                raise ValueError(f"stop must contain only strings, got {item!r}")
            if not item:
                raise ValueError(f"stop strings must be non-empty, got {item!r}")
        return tuple(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int, got {ids!r}")
        for item in ids:
            if not is_int(item):
                raise ValueError(f"stop_token_ids must contain only ints, got {item!r}")
            if item < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {item!r}")
        return tuple(int(i) for i in ids)

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty is set."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def top_k_enabled(self) -> bool:
        """True when top-k filtering is active (``top_k >= 1``)."""
        return self.top_k > 0
