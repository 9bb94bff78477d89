"""specserve: fast, lossless LLM decoding with speculative decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specserve.lazy import lazy_attributes

if TYPE_CHECKING:
    from specserve.api import LLM, RequestOutput
    from specserve.sampling.params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_attributes(
    globals(),
    {"LLM": "specserve.api", "RequestOutput": "specserve.api", "SamplingParams": "specserve.sampling.params"},
)
