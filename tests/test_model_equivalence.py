"""Our logits equal transformers' on the same weights (fp32): SmolLM2 from its GGUF file
and a tiny random-weight model of every supported family."""

from __future__ import annotations

import pytest
import torch

from specserve.cache import KVCache
from specserve.model.layers import build_attention_metadata
from specserve.model.loader import build_model, read_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-3
VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_configs():
    return {
        "llama": transformers.LlamaConfig(**COMMON),
        "llama3-rope": transformers.LlamaConfig(
            **COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "llama-tied": transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**COMMON, sliding_window=24),
        "qwen2": transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**COMMON, head_dim=32),
        # sliding window 16 < the 64-token prompt, interleaved with a global layer
        "gemma3": transformers.Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        ),
    }


def run_chunks(model, cfg, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of every position, fed through our cache in the given chunk sizes."""
    cache = KVCache(cfg.num_layers, 1, 512, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    slot = cache.allocate()
    window = cfg.sliding_window if any(cfg.sliding_layers) else None
    pos, out = 0, []
    with torch.inference_mode():
        for n in chunks:
            cache.ensure(slot, pos + n)
            meta = build_attention_metadata(cache, [slot], [n], [pos], torch.device("cpu"), window)
            hidden = model(ids[pos : pos + n], torch.arange(pos, pos + n), meta, cache)
            out.append(model.compute_logits(hidden))
            pos += n
            cache.commit(slot, pos)
    return torch.cat(out)


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_tiny_family_logits_match_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf_cfg = tiny_configs()[name]
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from their init value, so (1 + w) vs w matters
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, "cpu", 512)
    ids = torch.randint(0, VOCAB, (64,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    # one prefill, and the same tokens through the cache in chunks (decode + multi-token appends)
    for chunks in ([64], [40, 1, 5, 18]):
        ours = run_chunks(model, ckpt.config, ids, chunks)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"{name} chunks={chunks}: max abs logit difference {diff:.2e}"


def test_smollm_gguf_logits_match_transformers(llm_fp32, hf_smollm_fp32):
    text = (
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based inks and a wooden press adapted from those used to make "
        "wine. Within decades, presses spread across Europe and the cost of books fell sharply, so that "
        "ideas, news and scientific results could travel farther and faster than ever before in history."
    )
    ids = llm_fp32.tokenizer.encode(text)[:64]
    assert len(ids) == 64
    cfg = llm_fp32.config
    ours = run_chunks(llm_fp32.model, cfg, torch.tensor(ids), [48, 1, 15])
    with torch.no_grad():
        ref = hf_smollm_fp32(torch.tensor([ids])).logits[0].float()
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max abs logit difference {diff:.2e}"


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}')
    with pytest.raises(ValueError, match="unsupported architecture.*FalconForCausalLM"):
        read_checkpoint(tmp_path)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.gguf")
