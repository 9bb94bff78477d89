"""Streaming text output: incremental detokenization and stop-string handling.

Two independent pieces the generation loop chains once per step::

    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    stops = StopStringMatcher(["\\nUser:"])
    for new_ids in steps:                         # one or several ids per step
        result = stops.push(detok.add(new_ids))
        stream(result.text_to_emit)
        if result.stopped:
            break
    else:
        stream(stops.push(detok.flush()).text_to_emit + stops.flush())

:class:`IncrementalDetokenizer` turns token ids into text deltas that never split a multi-byte
UTF-8 character; :class:`StopStringMatcher` cuts the text before a stop string and holds back any
tail that might still grow into one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

__all__ = ["IncrementalDetokenizer", "StopResult", "StopStringMatcher"]

_REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to decode as context before the first output token (as vLLM/TGI do):
# enough for tokenizers whose decoding of a token depends on its left neighbours.
_PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one delta at a time.

    Uses the prefix/read offset technique of vLLM and TGI: each step decodes the window
    ``ids[prefix_offset:]`` and returns only the part beyond the already emitted
    ``ids[prefix_offset:read_offset]``. Decoding a short window (rather than single tokens) keeps
    spaces and merges right; a window whose text ends with U+FFFD (an incomplete UTF-8 character)
    is held back until the next ids complete it.

    The concatenation of all deltas returned by :meth:`add` and :meth:`flush` equals
    ``tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)`` for byte-level BPE
    tokenizers. With ``prompt_ids``, the last prompt tokens are used as decoding context, so
    tokenizers that strip a leading space at the start of a text (SentencePiece) keep the space
    that separates the first output word from the prompt.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...) -> str``
            (a :class:`specserve.tokenizer.Tokenizer`).
        prompt_ids: the prompt, used only as left context; its text is never emitted.
        skip_special_tokens: leave special tokens (EOS, ``<|im_end|>``...) out of the text.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def output_ids(self) -> list[int]:
        """All output ids added so far (prompt context excluded)."""
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def has_pending(self) -> bool:
        """Whether some added ids have not been turned into emitted text yet."""
        return self._read_offset < len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Iterable[int]) -> str:
        """Append ``new_ids`` (possibly several, possibly none) and return the new text delta.

        Returns ``""`` while the text would end in an incomplete UTF-8 character, or when the
        new ids add no text (e.g. skipped special tokens).
        """
        self._ids.extend(int(i) for i in new_ids)
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pieces.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a trailing U+FFFD at the end of generation).

        Call once when generation ends; the detokenizer can keep being used afterwards.
        """
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta


class StopResult(NamedTuple):
    """Outcome of one :class:`StopStringMatcher` step.

    Attributes:
        text_to_emit: new text that is now safe to stream to the client.
        stopped: a stop string was found; generation should end.
        truncated_text: the whole output text so far (previous text + delta), cut right before
            the stop string when ``stopped``. It includes text still held back.
    """

    text_to_emit: str
    stopped: bool
    truncated_text: str


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back tails that may become one.

    The text before the earliest stop string is emitted; the stop string itself and anything
    after it are not. A tail of the text that is a prefix of some stop string (e.g. ``"\\nUs"``
    for stop ``"\\nUser:"``) is held back until later text either completes the stop string or
    rules it out; when generation ends without a stop, release it with :meth:`flush`.

    Two equivalent ways to use it:

    * stateless: :meth:`check(text, delta) <check>` where ``text`` is everything generated
      before ``delta`` (including held-back text), and :meth:`held_back(text) <held_back>` at the
      end. The amount held back is a function of ``text`` alone, so the caller only needs to keep
      the accumulated text.
    * stateful: :meth:`push(delta) <push>` each step and :meth:`flush` at the end; the matcher
      accumulates the text itself (:attr:`text`).

    With no stop strings everything passes straight through.

    Args:
        stops: the stop strings; empty strings are rejected.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        stops = list(stops)
        for stop in stops:
            if not isinstance(stop, str):
                raise TypeError(f"stop strings must be str, got {type(stop).__name__}.")
            if not stop:
                raise ValueError("stop strings must not be empty.")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._text = ""
        self._stopped = False
        self._finished = False

    # ------------------------------------------------------------------ stateless API

    def held_back(self, text: str) -> str:
        """The tail of ``text`` that is a proper prefix of a stop string (``""`` if none).

        ``text`` is assumed to contain no complete stop string. This is exactly the text a
        previous :meth:`check` kept back, to be emitted when generation ends without a stop.
        """
        if not self.stops:
            return ""
        longest = 0
        # Only suffixes shorter than the longest stop can be a proper prefix of one.
        for length in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-length:]
            if any(len(stop) > length and stop.startswith(tail) for stop in self.stops):
                longest = length
                break
        return text[len(text) - longest :] if longest else ""

    def find_stop(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string occurrence in ``text`` at or after ``start``, or -1."""
        best = -1
        for stop in self.stops:
            index = text.find(stop, start)
            if index != -1 and (best == -1 or index < best):
                best = index
        return best

    def check(self, text: str, delta: str) -> StopResult:
        """Process one step: ``delta`` is new text following ``text``.

        Args:
            text: all text generated before this step (held-back text included); it must not
                contain a complete stop string (generation would have stopped).
            delta: the new text of this step (may be several tokens' worth, or empty).

        Returns:
            A :class:`StopResult`. Its ``text_to_emit`` covers text released by this step: the
            previously held-back tail when it turned out not to be a stop string, plus new text,
            minus anything that may still start a stop string.
        """
        combined = text + delta
        emitted = len(text) - len(self.held_back(text))
        if not self.stops:
            return StopResult(combined[emitted:], False, combined)
        # A stop that was not in `text` must end inside `delta`.
        index = self.find_stop(combined, max(0, len(text) - self._max_len + 1))
        if index != -1:
            truncated = combined[:index]
            return StopResult(truncated[emitted:], True, truncated)
        hold = len(self.held_back(combined))
        return StopResult(combined[emitted : len(combined) - hold], False, combined)

    # ------------------------------------------------------------------ stateful API

    @property
    def text(self) -> str:
        """Stateful API: all text pushed so far (truncated before the stop string once stopped)."""
        return self._text

    @property
    def stopped(self) -> bool:
        """Stateful API: whether a stop string has been found."""
        return self._stopped

    def push(self, delta: str) -> StopResult:
        """Stateful :meth:`check`: process ``delta`` against the text pushed so far.

        After a stop, further pushes are ignored and return an empty, stopped result.

        Raises:
            RuntimeError: called after :meth:`flush`.
        """
        if self._finished:
            raise RuntimeError("StopStringMatcher.push() called after flush().")
        if self._stopped:
            return StopResult("", True, self._text)
        result = self.check(self._text, delta)
        self._text = result.truncated_text
        self._stopped = result.stopped
        return result

    def flush(self) -> str:
        """Stateful API: release the held-back tail at the end of generation (``""`` if stopped).

        Ends the stream: later calls return ``""`` and :meth:`push` is refused.
        """
        if self._stopped or self._finished:
            self._finished = True
            return ""
        self._finished = True
        return self.held_back(self._text)
