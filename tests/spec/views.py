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
