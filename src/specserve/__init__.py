"""specserve: fast, lossless LLM decoding with speculative decoding."""

from specserve.api import LLM, RequestOutput
from specserve.sampling.params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
