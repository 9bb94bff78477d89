"""Shared fixtures: the real default model (loaded once per session) and its reference."""

from __future__ import annotations

import os

import pytest
import torch

from specserve.model.loader import default_model_path


def pytest_configure(config):
    # xdist's workers start after this and inherit the environment: give each its share of
    # the cores, so that the workers together run as many OpenMP threads (the native layers'
    # and PyTorch's) as there are cores, not that many each
    workers = getattr(config.option, "numprocesses", None) or 0
    if workers > 1 and not hasattr(config, "workerinput"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


def pytest_collection_modifyitems(config, items):
    # SPECSERVE_GPU_TESTS_ON=cpu runs the gpu-marked tests on the CPU (a dry run of the device checks)
    if torch.cuda.is_available() or os.environ.get("SPECSERVE_GPU_TESTS_ON") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def questions_file():
    """The Spec-Bench questions file (the test is skipped where it cannot be found)."""
    from specserve.bench.workload import find_questions_file

    try:
        return find_questions_file()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def llm_fp32():
    from specserve import LLM

    return LLM(dtype="float32", device="cpu", max_num_seqs=16, max_model_len=2048)


@pytest.fixture(scope="session")
def llm_bf16():
    from specserve import LLM

    return LLM(dtype="bfloat16", device="cpu", max_num_seqs=16, max_model_len=2048)


@pytest.fixture(scope="session")
def llm_exact(request):
    """The default model where every way of computing a request gives the same tokens
    (`bit_exact`): bf16 on the native layers, the served default, 4x faster than the fp32
    PyTorch path on a CPU without AMX; fp32 elsewhere. Tests of speculation, sampling and
    training logic use it and stay strict on every machine; tests of the PyTorch compute
    path itself ask for `llm_fp32`."""
    from specserve.equivalence import bit_exact

    llm = request.getfixturevalue("llm_bf16")
    return llm if bit_exact(llm) else request.getfixturevalue("llm_fp32")


@pytest.fixture(scope="session")
def hf_smollm_fp32(gguf_path):
    """transformers' own model from the same GGUF file (it dequantizes it itself)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()


# long-form questions: greedy answers run to the 128-token limit
CHAT_PROMPTS = [
    "Write a detailed essay about the history of the city of Rome.",
    "Explain in detail how a binary search works, step by step, with an example in Python.",
    "Describe the water cycle in detail for a school textbook.",
    "Write a long story about a robot who learns to paint.",
    "Give a detailed comparison of trains, cars and planes for travelling across Europe.",
]
