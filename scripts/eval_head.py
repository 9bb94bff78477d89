#!/usr/bin/env python3
"""Teacher-forced accuracy of EAGLE heads by drafting depth, side by side in one run.

The target answers 26 Spec-Bench first turns (2 per category) and 26 held-out template
prompts (`synth_prompts` with another seed than training's) greedily, 128 tokens. Each head
then guesses every response token at depths 1-4 with `specserve.spec.train.unrolled`: depth
1 reads the target's real features, depth d the head's own guesses along the path, and
attends as drafting does. Depth d's top-k is the share of response tokens the head ranks in
its k best when the d - 1 tokens before it were drafted right (drafting's conditional
acceptance for a top-k tree, before the tree's budget cuts it). Spec-Bench is used only to
evaluate, never to train.

    .venv/bin/python scripts/eval_head.py eagle /work/heads/new   # "eagle" is the packaged head
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from specserve import LLM
from specserve.bench.workload import load_questions
from specserve.spec.eagle import DEFAULT_EAGLE, EagleHead
from specserve.spec.heads import read_head_dir
from specserve.spec.train import _batch_tensors, _frozen_target, _generate, synth_prompts, target_features, unrolled

DEPTHS = 4
TOPS = (1, 4)


def eval_sets(llm, feature_layers: list[int]) -> dict[str, dict]:
    """The answers to both prompt sets, with features that carry every layer a head reads."""
    per_cat: dict[str, list[str]] = {}
    for q in load_questions():
        if len(per_cat.setdefault(q.category, [])) < 2:
            per_cat[q.category].append(q.turns[0])
    sets = {"Spec-Bench": [p for ps in per_cat.values() for p in ps], "held-out templates": synth_prompts(26, seed=12345)}
    out = {}
    for name, prompts in sets.items():
        samples = _generate(llm, prompts, 128, 8, name)
        feats = target_features(llm.engine.runner.model, [p + o for p, o in samples], feature_layers=feature_layers)
        out[name] = {"tokens": [torch.tensor(p + o) for p, o in samples], "feats": feats,
                     "response_start": [len(p) for p, _ in samples], "feature_layers": feature_layers}
    return out


def path_of(arg: str) -> str:
    return str(DEFAULT_EAGLE) if arg == "eagle" else arg.removeprefix("eagle:")


def load(arg: str, model) -> EagleHead:
    info, state = read_head_dir(path_of(arg), model, "eagle")
    head = EagleHead(model.config, int(info["draft_vocab_size"]), info.get("feature_layers", ()))
    head.load_state_dict(state)
    return head.float().bind(_frozen_target(model)).eval()


def accuracy(head: EagleHead, data: dict) -> list[list[float]]:
    """[depth][top index] share of response tokens guessed (the data's feature rows may carry
    more layers than this head reads: it gets its own)."""
    H = head.config.hidden_size
    cols = [0] + [1 + data["feature_layers"].index(i) for i in head.feature_layers]
    data = {**data, "feats": [torch.cat([f[:, c * H : (c + 1) * H] for c in cols], dim=-1) for f in data["feats"]]}
    to_draft = torch.full((head.config.vocab_size,), -100, dtype=torch.long)
    to_draft[head.draft_ids] = torch.arange(len(head.draft_ids))
    hits = torch.zeros(DEPTHS, len(TOPS))
    total = torch.zeros(DEPTHS)
    for start in range(0, len(data["tokens"]), 4):
        idx = list(range(start, min(start + 4, len(data["tokens"]))))
        tok_in, feat_in, taps_in, _, label, weight = _batch_tensors(data, idx, to_draft, 1.0, H)
        L = tok_in.shape[1]
        with torch.inference_mode():
            for depth, (_, logits) in enumerate(unrolled(head, tok_in, feat_in, DEPTHS, taps=taps_in)):
                keep = (weight * (torch.arange(L) >= depth)).reshape(-1).bool()  # a root `depth` rows back
                lab = label.reshape(-1)[keep]  # -100 (outside the draft vocabulary) is always a miss
                best = logits[keep].topk(max(TOPS), dim=-1).indices
                for j, k in enumerate(TOPS):
                    hits[depth, j] += (best[:, :k] == lab[:, None]).any(-1).sum()
                total[depth] += keep.sum()
    return (hits / total[:, None]).tolist()


def main(heads: list[str]) -> None:
    llm = LLM(max_num_seqs=8, max_model_len=2048)
    model = llm.engine.runner.model
    layers = sorted({i for arg in heads for i in json.loads((Path(path_of(arg)) / "config.json").read_text())
                     .get("feature_layers", [])})
    sets = eval_sets(llm, layers)
    header = " | ".join(f"depth {d + 1} top-{k}" for d in range(DEPTHS) for k in TOPS)
    for name, data in sets.items():
        print(f"\n{name}: {sum(len(t) - s for t, s in zip(data['tokens'], data['response_start']))} response tokens")
        print(f"| head | {header} |")
        print("|---|" + "---:|" * (DEPTHS * len(TOPS)))
        for arg in heads:
            acc = accuracy(load(arg, model), data)
            print(f"| {arg} | " + " | ".join(f"{a:.1%}" for row in acc for a in row) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["eagle"])
