"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face tokenizer directory.

The heavy lifting is done by the Hugging Face ``tokenizers`` library; this module only assembles
the right ``tokenizers.Tokenizer`` (vocabulary, merges, pre-tokenizer, decoder, added tokens) and
adds what an inference engine needs on top: BOS/EOS handling and chat-template rendering.

Typical use::

    tok = Tokenizer.from_gguf(path)                    # or Tokenizer.from_hf_dir(directory)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)
    text = tok.decode(ids)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "ChatTemplateError",
    "GGUF_PRE_TOKENIZER_REGEXES",
    "Tokenizer",
    "TokenType",
    "bytes_to_unicode",
]


class TokenType:
    """``tokenizer.ggml.token_type`` values, as llama.cpp defines them."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ChatTemplateError(ValueError):
    """A chat template could not be rendered (bad messages, ``raise_exception`` in the template...)."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# --------------------------------------------------------------------------------------------
# Pre-tokenizers, keyed by ``tokenizer.ggml.pre``. Each entry lists the regexes llama.cpp applies
# one after the other (every piece produced by one regex is split again by the next). The
# special value ``_GPT2`` stands for GPT-2's own regex, which ``ByteLevel(use_regex=True)`` applies.
# --------------------------------------------------------------------------------------------

_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

_LLAMA3 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_QWEN2 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_QWEN35 = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_GPT4O = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_TEKKEN = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_DIGIT = "\\p{N}"

# llama.cpp's fallback for files that name no pre-tokenizer ("default").
_LLAMA_CPP_DEFAULT = (
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    _GPT2,
    "\\p{N}+",
    "[0-9][0-9][0-9]",
)

GGUF_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": _LLAMA_CPP_DEFAULT,
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "olmo": (_GPT2,),
    "jais": (_GPT2,),
    "smollm": (_DIGIT, _GPT2),
    "starcoder": (_DIGIT, _GPT2),
    "refact": (_DIGIT, _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "megrez": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
    "tekken": (_TEKKEN,),
}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for a byte-level BPE vocabulary whose ``tokenizer.ggml.pre`` is ``pre``."""
    if pre == "smollm" or pre in ("starcoder", "refact"):
        # Exactly what SmolLM2's / StarCoder's own tokenizer.json uses.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("gpt-2", "gpt2", "olmo", "jais"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    try:
        regexes = GGUF_PRE_TOKENIZER_REGEXES[pre]
    except KeyError:
        raise ValueError(
            f"Unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}. "
            f"Supported: {sorted(GGUF_PRE_TOKENIZER_REGEXES)}."
        ) from None
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


# --------------------------------------------------------------------------------------------
# GGUF metadata access
# --------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """Decode a ``gguf.ReaderField`` into a Python value (str, int, float, bool or list).

    Anything that is not a ``ReaderField`` (e.g. a plain value in a hand-made dict) is returned as is,
    so :meth:`Tokenizer.from_gguf_fields` also accepts already-decoded metadata.
    """
    if not (hasattr(field, "parts") and hasattr(field, "data") and hasattr(field, "types")):
        return field
    import gguf  # local import: only needed for GGUF input

    types = list(field.types)
    if not types:
        return None
    string_t = gguf.GGUFValueType.STRING
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == string_t:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(types) > 1 and types[1] == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"Nested GGUF arrays are not supported (field {field.name!r}).")
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == string_t:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


def _get(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return _field_value(fields[key]) if key in fields else default


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Same as transformers: Jinja's own tojson HTML-escapes, which chat templates do not want.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like ``transformers`` does."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"Invalid chat template (line {exc.lineno}): {exc.message}") from exc


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` is a list of ``{"role": str, "content": str, ...}`` dicts; return plain copies."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}.")
    if not messages:
        raise ValueError("messages must not be empty.")
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}.")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{index}] is missing the {key!r} key.")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"messages[{index}][{key!r}] must be a str, got {type(message[key]).__name__}."
                )
        checked.append(dict(message))
    return checked


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A text tokenizer for one model: encode/decode, special tokens and chat template.

    Build it with :meth:`from_gguf` / :meth:`from_gguf_fields` or :meth:`from_hf_dir`, or wrap a
    ready ``tokenizers.Tokenizer`` directly.

    Attributes:
        vocab_size: number of ids, added tokens included.
        bos_token_id: the beginning-of-sequence id, or ``None``.
        eos_token_ids: every id that ends generation.
        add_bos: whether :meth:`encode` prepends ``bos_token_id`` (when ``add_special_tokens``).
        chat_template: Jinja chat template source, or ``None``.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        self._tok = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in eos_token_ids)
        self.add_bos: bool = bool(add_bos) and bos_token_id is not None
        self.chat_template: str | None = chat_template
        self.pad_token_id: int | None = pad_token_id
        self.unk_token_id: int | None = unk_token_id
        for name, value in (("bos_token_id", bos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {self.vocab_size}).")
        bad = [i for i in self.eos_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"eos token ids {sorted(bad)} are outside the vocabulary (size {self.vocab_size})."
            )
        # The first EOS id found in this order names the `eos_token` string given to chat templates.
        self._primary_eos_id: int | None = min(self.eos_token_ids) if self.eos_token_ids else None

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load the tokenizer stored in a GGUF file's metadata."""
        from specserve.model.gguf_file import read_gguf

        return cls.from_gguf_fields(read_gguf(path).metadata)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata: plain values (``read_gguf(path).metadata``) or ``gguf.GGUFReader(path).fields``.

        Only ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) is supported; the pre-tokenizer is
        chosen from ``tokenizer.ggml.pre`` (see :data:`GGUF_PRE_TOKENIZER_REGEXES`). Tokens typed
        CONTROL become special added tokens and USER_DEFINED ones plain added tokens, so both are
        matched whole in the input text.

        Raises:
            ValueError: metadata missing, or an unsupported tokenizer model / pre-tokenizer.
        """
        model = _get(fields, "tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model; this file carries no tokenizer.")
        if model != "gpt2":
            raise ValueError(
                f"Unsupported GGUF tokenizer model tokenizer.ggml.model={model!r}; "
                "only 'gpt2' (byte-level BPE) is supported."
            )
        tokens: list[str] = _get(fields, "tokenizer.ggml.tokens")
        merges: list[str] | None = _get(fields, "tokenizer.ggml.merges")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens.")
        if merges is None:
            raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges.")
        token_types: list[int] = _get(fields, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens."
            )
        pre = _get(fields, "tokenizer.ggml.pre") or "default"

        backend = _build_byte_level_bpe(tokens, merges, token_types, pre)

        def token_id(key: str) -> int | None:
            value = _get(fields, key)
            return None if value is None else int(value)

        bos = token_id("tokenizer.ggml.bos_token_id")
        eos_ids = {
            i
            for i in (
                token_id("tokenizer.ggml.eos_token_id"),
                token_id("tokenizer.ggml.eot_token_id"),
                token_id("tokenizer.ggml.eom_token_id"),
            )
            if i is not None
        }
        add_bos = bool(_get(fields, "tokenizer.ggml.add_bos_token", False))
        template = _get(fields, "tokenizer.chat_template")
        tokenizer = cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            chat_template=template if isinstance(template, str) else None,
            pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
            unk_token_id=token_id("tokenizer.ggml.unknown_token_id"),
        )
        primary = token_id("tokenizer.ggml.eos_token_id")
        if primary is not None:
            tokenizer._primary_eos_id = primary
        return tokenizer

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (``tokenizer.json`` + optional configs).

        Reads ``tokenizer_config.json`` (chat_template, bos/eos tokens, add_bos_token),
        ``chat_template.jinja`` (overrides the config's template) and ``generation_config.json``
        (``eos_token_id``: int or list, all of them end generation).

        Raises:
            FileNotFoundError: the directory or its ``tokenizer.json`` does not exist.
            ValueError: a config file is malformed.
        """
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Tokenizer directory {directory!r} does not exist.")
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(
                f"No tokenizer.json in {directory!r}; only fast (tokenizers) tokenizer files are supported."
            )
        backend = HFTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        gen_config = _read_json(os.path.join(directory, "generation_config.json"))

        def config_token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, Mapping):
                token = token.get("content")
            if not isinstance(token, str):
                return None
            return backend.token_to_id(token)

        bos = config_token_id("bos_token")
        if bos is None and isinstance(gen_config.get("bos_token_id"), int):
            bos = gen_config["bos_token_id"]

        eos_ids: set[int] = set()
        primary_eos = config_token_id("eos_token")
        if primary_eos is not None:
            eos_ids.add(primary_eos)
        gen_eos = gen_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            gen_eos = [gen_eos]
        if gen_eos is not None:
            if not isinstance(gen_eos, list) or not all(isinstance(i, int) for i in gen_eos):
                raise ValueError(
                    "generation_config.json eos_token_id must be an int or a list of ints, "
                    f"got {gen_eos!r}."
                )
            eos_ids.update(gen_eos)
            if primary_eos is None and gen_eos:
                primary_eos = gen_eos[0]

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # No explicit flag: follow what the tokenizer.json post-processor would do (e.g. Llama 3).
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos

        template = _read_chat_template(directory, config)
        pad = config_token_id("pad_token")
        unk = config_token_id("unk_token")
        tokenizer = cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            chat_template=template,
            pad_token_id=pad,
            unk_token_id=unk,
        )
        if primary_eos is not None:
            tokenizer._primary_eos_id = primary_eos
        return tokenizer

    # ---------------------------------------------------------------- properties

    @property
    def backend(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text, or ``None``."""
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token_id(self) -> int | None:
        """The main EOS id (the one the model's metadata names first), or ``None``."""
        return self._primary_eos_id

    @property
    def eos_token(self) -> str | None:
        """The main EOS token's text, or ``None``."""
        return None if self._primary_eos_id is None else self.id_to_token(self._primary_eos_id)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (skipped by ``decode(skip_special_tokens=True)``)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_ids={sorted(self.eos_token_ids)}, add_bos={self.add_bos}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``. Special tokens written in the text (``<|im_start|>``) become one id.

        ``add_special_tokens`` prepends BOS when the model wants it (:attr:`add_bos`); it never
        adds EOS.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}.")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for several texts (tokenized in parallel by the backend)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        prefix: list[int] = []
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            prefix = [self.bos_token_id]
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; invalid UTF-8 byte sequences come out as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level spelling for BPE) for ``token_id``, or ``None``."""
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token``, or ``None``."""
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """:meth:`id_to_token` for each id."""
        return [self._tok.id_to_token(int(i)) for i in ids]

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template (like transformers, ``tokenize=False``).

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``; role and content must be str.
            add_generation_prompt: append the header that starts the assistant's reply.
            **kwargs: extra variables for the template (e.g. ``tools``, ``enable_thinking``).

        Raises:
            ValueError: the model has no chat template, the messages are malformed, or the
                template itself refuses them (:class:`ChatTemplateError`).
        """
        if not self.chat_template:
            raise ValueError("This model has no chat template; cannot apply_chat_template().")
        checked = _validate_messages(messages)
        template = _compile_chat_template(self.chat_template)
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }
        if self.pad_token_id is not None:
            context["pad_token"] = self.id_to_token(self.pad_token_id)
        if self.unk_token_id is not None:
            context["unk_token"] = self.id_to_token(self.unk_token_id)
        context.update(kwargs)
        context["messages"] = checked
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"Chat template failed to render: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _build_byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str
) -> HFTokenizer:
    """Assemble a byte-level BPE ``tokenizers.Tokenizer`` from GGUF vocabulary data."""
    alphabet = frozenset(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    added_types = (TokenType.CONTROL, TokenType.USER_DEFINED)
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type not in added_types and not set(token) <= alphabet:
            # A normal token written in plain text: respell it in the byte alphabet.
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)

    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"Malformed BPE merge {merge!r} in tokenizer.ggml.merges.")
        pairs.append((left, right))

    backend = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()

    special = [
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TokenType.CONTROL and token
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TokenType.USER_DEFINED and token
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"Built vocabulary has {backend.get_vocab_size(with_added_tokens=True)} ids, "
            f"expected {len(tokens)} (duplicate tokens in the GGUF vocabulary?)."
        )
    return backend


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``, ``{}`` if the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _read_chat_template(directory: str, config: Mapping[str, Any]) -> str | None:
    """The chat template: ``chat_template.jinja`` if present, else the one in ``tokenizer_config.json``."""
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
