"""The `--spec` grammar: method names and hybrids (no PyTorch, so the CLI checks a spec
before it loads anything)."""

from __future__ import annotations

SPEC_METHODS = (
    "ngram", "suffix", "draft-model:PATH", "layer-skip[:L1,L2,...]", "eagle[:DIR]", "medusa[:DIR]",
    "ngram+MODEL", "suffix+MODEL",
)
RETRIEVAL = ("ngram", "suffix")  # the drafters that can lead a hybrid: RETRIEVAL+MODEL (MODEL: any other method)


def split_hybrid(spec: str) -> tuple[str | None, str]:
    """`"ngram+eagle:DIR"` -> `("ngram", "eagle:DIR")`; a spec without a retrieval lead -> `(None, spec)`."""
    lead, plus, rest = spec.partition("+")
    if plus and lead in RETRIEVAL:
        return lead, rest
    return None, spec


def hybrid_error(spec: str) -> str | None:
    """Why `spec` is not a valid hybrid (`RETRIEVAL+MODEL`), or None (also for a plain method)."""
    lead, model = split_hybrid(spec)
    if lead is not None and (model.partition(":")[0] in RETRIEVAL or split_hybrid(model)[0] is not None):
        return f"{lead}+ pairs with a model drafter (eagle, medusa, draft-model, layer-skip), got {spec!r}"
    return None
