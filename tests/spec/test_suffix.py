"""SuffixDrafter: bounded-depth suffix tries over the request and past outputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.spec.views import view
from specserve.spec.base import DraftProposal
from specserve.spec.suffix import SuffixDrafter, _Trie



def propose1(
    drafter: SuffixDrafter, tokens: list[int], budget: int = 16, rid: str = "r"
) -> list[int]:
    return drafter.propose([view(rid, tokens)], [budget]).token_ids[0]


def finish(drafter: SuffixDrafter, rid: str, prompt: list[int], output: list[int]) -> None:
    """Run a request to completion: the engine's last observe, then release."""
    drafter.observe([view(rid, prompt + output, len(prompt))], [0])
    drafter.release(rid)


BASE = list(range(10, 40))  # 30 distinct tokens


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_depth": 1}, "max_depth"),
        ({"num_spec_tokens": 0}, "num_spec_tokens"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"min_token_prob": 1.5}, "min_token_prob"),
        ({"min_match": 0}, "min_match"),
        ({"min_match": 24, "max_depth": 24}, "min_match"),
        ({"max_global_tokens": -1}, "max_global_tokens"),
        ({"global_include_prompts": 1}, "global_include_prompts"),
    ],
)
def test_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SuffixDrafter(**kwargs)


def test_protocol_shape_and_budgets():
    d = SuffixDrafter(num_spec_tokens=4)
    assert d.name == "suffix"
    seq = BASE + [99] + BASE[:10]  # match of 10 -> up to 10 tokens before the caps
    out = d.propose([view("a", seq), view("b", seq), view("c", seq)], [0, 2, 16])
    assert isinstance(out, DraftProposal)
    assert out.token_ids == [[], BASE[10:12], BASE[10:14]]  # c capped by num_spec_tokens
    assert out.probs == [None, None, None]
    with pytest.raises(ValueError, match="budgets"):
        d.propose([view("a", seq)], [1, 2])
    with pytest.raises(ValueError, match="budgets"):
        d.propose([view("a", seq)], [-1])


def test_repeated_pattern_in_own_context():
    d = SuffixDrafter()
    assert propose1(d, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]) == [4, 5, 6]


def test_adaptive_length_grows_with_match_length():
    lengths = []
    for m in range(2, 12):
        d = SuffixDrafter()
        out = propose1(d, BASE + [99] + BASE[:m])
        assert out == BASE[m : 2 * m]  # ceil(1.0 * m) tokens
        lengths.append(len(out))
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    # alpha scales the cap: ceil(0.5 * 5) = 3
    assert propose1(SuffixDrafter(alpha=0.5), BASE + [99] + BASE[:5]) == BASE[5:8]


def test_chain_continues_past_the_depth_limit():
    """A 10-token match in a depth-12 trie reaches the depth limit after 2 tokens;
    re-anchoring on (context + chain) carries the chain on."""
    d = SuffixDrafter(max_depth=12, num_spec_tokens=16)
    assert propose1(d, BASE + [99] + BASE[:10]) == BASE[10:20]


def test_min_match():
    seq = [5, 6, 7, 8, 5]  # longest match with a continuation: "5" (length 1)
    assert propose1(SuffixDrafter(), seq) == []  # default min_match=2
    assert propose1(SuffixDrafter(min_match=1), seq) == [6]
    assert propose1(SuffixDrafter(min_match=3), [1, 2, 3, 9, 2, 3]) == []


def test_min_token_prob_cutoff():
    # "1 2 3" is always followed by 4 (p = 12/13), but "1 2 3 4" by 12 different
    # tokens once each (p = 1/12 < 0.1)
    seq = [t for i in range(12) for t in (1, 2, 3, 4, 200 + i)] + [1, 2, 3]
    assert propose1(SuffixDrafter(), seq) == [4]
    out = propose1(SuffixDrafter(min_token_prob=0.0), seq)
    assert len(out) == 3 and out[0] == 4 and 200 <= out[1] < 212
    # a higher threshold cuts the first step too
    assert propose1(SuffixDrafter(min_token_prob=0.95), seq) == []


def test_global_history_helps_a_new_request():
    output = list(range(100, 130))
    d = SuffixDrafter()
    d.propose([view("a", [1, 2, 3], 3)], [4])
    finish(d, "a", [1, 2, 3], output)
    assert d.num_active_requests == 0
    assert d.num_global_tokens == len(output)  # outputs only by default
    assert d.num_global_sequences == 1
    new_ctx = [7, 8, 9] + output[:3]
    assert propose1(d, new_ctx, rid="b") == output[3:6]
    assert propose1(SuffixDrafter(), new_ctx, rid="b") == []  # no history, no match
    # a longer match proposes more
    assert propose1(d, [7, 8, 9] + output[:8], rid="c") == output[8:16]


def test_global_include_prompts_flag():
    prompt, output = list(range(40, 50)), list(range(60, 70))
    for include, want in ((False, []), (True, prompt[5:10])):
        d = SuffixDrafter(global_include_prompts=include)
        finish(d, "a", prompt, output)
        assert d.num_global_tokens == len(output) + (len(prompt) if include else 0)
        assert propose1(d, [1] + prompt[:5], rid="b") == want


def test_observe_only_request_reaches_global_history():
    d = SuffixDrafter()
    d.propose([view("a", [1, 2, 3], 3)], [0])  # zero budget: nothing, not synced
    d.observe([view("a", [1, 2, 3, 50, 51, 52, 53], 3)], [0])
    d.release("a")
    assert d.num_global_tokens == 4
    assert propose1(d, [9, 50, 51], rid="b") == [52, 53]


def test_global_history_stays_bounded():
    d = SuffixDrafter(max_global_tokens=100)
    outputs = [[1000 * (i + 1) + j for j in range(30)] for i in range(20)]
    for i, out in enumerate(outputs):
        finish(d, f"r{i}", [0], out)
        assert 0 < d.num_global_tokens <= 100
        assert d.num_global_tokens == 30 * d.num_global_sequences
    # recent outputs are remembered, the oldest were dropped
    assert propose1(d, [5] + outputs[-1][:4], rid="new") == outputs[-1][4:8]
    assert propose1(d, [5] + outputs[0][:4], rid="old") == []
    # one sequence longer than the bound keeps its last tokens only
    d = SuffixDrafter(max_global_tokens=100)
    finish(d, "big", [0], list(range(5000, 5250)))
    assert d.num_global_tokens == 100
    # max_global_tokens=0 disables the global history
    d = SuffixDrafter(max_global_tokens=0)
    finish(d, "a", [0], list(range(100, 130)))
    assert d.num_global_tokens == 0 and d.num_global_nodes() == 0


def test_release_frees_state():
    d = SuffixDrafter()
    d.propose([view("a", [1, 2, 1, 2]), view("b", [3, 4, 3])], [2, 2])
    assert d.num_active_requests == 2
    d.release("a")
    assert d.num_active_requests == 1
    d.release("a")  # already released / unknown: no-op
    d.release("nope")
    d.release("b")
    assert d.num_active_requests == 0


def test_changed_sequence_rebuilds():
    d = SuffixDrafter()
    assert propose1(d, [1, 2, 3, 1, 2]) == [3, 1]
    seq = [7, 8, 9, 7, 8]  # same request id, not an extension of the previous list
    assert propose1(d, seq) == propose1(SuffixDrafter(), seq) == [9, 7]
    assert propose1(d, [7, 8]) == []  # shorter


def _naive_counts(streams: list[list[int]], depth: int) -> Counter:
    counts: Counter = Counter()
    for s in streams:
        for i in range(len(s)):
            for d in range(1, min(depth, len(s) - i) + 1):
                counts[tuple(s[i : i + d])] += 1
    return counts


def test_trie_counts_are_exact():
    """The lazily expanded trie (fed in ragged chunks) holds exactly every
    substring of length <= max_depth with its occurrence count."""
    rng = random.Random(5)
    for _ in range(40):
        depth = rng.randint(2, 6)
        streams = [[rng.randrange(3) for _ in range(rng.randint(0, 25))] for _ in range(3)]
        trie = _Trie(depth)
        for s in streams:
            live: list[int] = []
            windows: list = []
            pos = 0
            while pos < len(s):
                step = rng.randint(1, 4)
                start = len(live)
                live.extend(s[pos : pos + step])
                pos += step
                windows = trie.extend(windows, live, start)
        for sub, count in _naive_counts(streams, depth).items():
            cur = trie.walk(list(sub), 0)
            assert cur is not None
            node, off = cur
            assert (node.count if off == 0 else 1) == count, sub
        assert trie.walk([7], 0) is None
        assert trie.num_tokens == sum(map(len, streams))


def test_incremental_matches_fresh_drafter():
    """Property: a long-lived drafter (incremental request tries, releases into a
    small, evicting global history) proposes exactly what a fresh drafter does that
    is given the same finished requests and the current sequences at once."""
    rng = random.Random(99)
    for trial in range(8):
        kw = dict(
            max_depth=rng.randint(3, 8),
            num_spec_tokens=rng.randint(1, 8),
            min_match=1,
            min_token_prob=rng.choice([0.0, 0.1, 0.4]),
            max_global_tokens=60,
        )
        live = SuffixDrafter(**kw)
        finished: list[tuple[str, list[int], int]] = []
        active: dict[str, tuple[list[int], int]] = {}
        next_id = 0
        for step in range(30):
            while len(active) < 3:
                prompt = [rng.randrange(3) for _ in range(rng.randint(1, 6))]
                active[f"q{next_id}"] = (prompt, len(prompt))
                next_id += 1
            for toks, _ in active.values():
                toks.extend(rng.randrange(3) for _ in range(rng.randint(0, 3)))
            rids = list(active)
            budgets = [rng.randint(0, 8) for _ in rids]
            views = [view(r, list(active[r][0]), active[r][1]) for r in rids]
            fresh = SuffixDrafter(**kw)
            for rid, toks, n_prompt in finished:
                finish(fresh, rid, toks[:n_prompt], toks[n_prompt:])
            got = live.propose(views, budgets).token_ids
            want = fresh.propose(views, budgets).token_ids
            assert got == want, (trial, step)
            live.observe(views, [0] * len(views))
            if rng.random() < 0.3:  # finish one request
                rid = rng.choice(rids)
                toks, n_prompt = active.pop(rid)
                live.release(rid)
                finished.append((rid, list(toks), n_prompt))
        assert live.num_global_tokens <= 60


def test_long_context_steps_stay_cheap():
    """4,000-token context plus a populated global history, 500 decode steps of
    1-3 tokens: must finish quickly (no timing assertion)."""
    rng = random.Random(3)
    phrases = [[rng.randrange(500) for _ in range(rng.randint(2, 8))] for _ in range(200)]

    def text(n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out.extend(rng.choice(phrases) if rng.random() < 0.6 else [rng.randrange(500)])
        return out[:n]

    d = SuffixDrafter()
    for i in range(4):
        finish(d, f"old{i}", [1], text(1000))
    tokens = text(4000)
    proposed = 0
    for _ in range(500):
        out = d.propose([view("long", tokens, 100)], [16]).token_ids[0]
        assert len(out) <= 16
        proposed += len(out)
        tokens.extend(text(rng.randint(1, 3)))
    assert proposed > 0
    d.release("long")
    assert d.num_active_requests == 0
