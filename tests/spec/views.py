"""Shared helpers for the drafter unit tests."""

from __future__ import annotations

from specserve.sampling.params import SamplingParams
from specserve.spec.base import SequenceView

_PARAMS = SamplingParams()


def view(request_id: str, tokens: list[int], num_prompt_tokens: int = 0) -> SequenceView:
    return SequenceView(
        request_id=request_id,
        token_ids=tokens,
        num_prompt_tokens=num_prompt_tokens,
        params=_PARAMS,
        slot=0,
    )


def run_together(llm, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """Decode the requests in one batch with the LLM's current drafter, then turn speculation off."""
    try:
        engine = llm.engine
        seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        while not all(s.finished for s in seqs):
            engine.step()
        return seqs
    finally:
        llm.set_spec(None)


def generate_with(llm, spec: str, prompts: list[list[int]], params: SamplingParams, k: int = 10, adaptive: bool = False):
    """`llm.generate` with the drafter `spec` (fixed budget k unless adaptive), then plain again."""
    llm.set_spec(spec, k, adaptive)
    try:
        return llm.generate(prompts, params)
    finally:
        llm.set_spec(None)
