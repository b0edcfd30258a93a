"""Shared fixtures: real models and text from ../shared (skipped when absent) and from installed packages."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tests use small models, where threading costs more than it gives, and stay fast on a busy machine.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
# Tests import SHARED/STORIES from here, so LOWBIT_SHARED moves every test's data at once.
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts at one thread, whatever an earlier test (an engine with --threads) set."""
    torch.set_num_threads(1)
    yield


# A chat template for stories260K (which has none), so the server's chat route can be tested on it.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def stories_chat():
    """(model, tokenizer) of stories260K with CHAT_TEMPLATE (a fresh copy per test module: servers change it)."""
    from lowbit.models.loading import load_model

    model, tokenizer = load_model(STORIES)
    tokenizer.chat_template = CHAT_TEMPLATE
    return model, tokenizer


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (shared test data lives in ../shared, or set LOWBIT_SHARED)")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return shared_path("models", "stories260K")


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return shared_path("corpora", "tinystories-valid.txt")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return shared_path("corpora", "wikitext2-raw-test.txt")


@pytest.fixture(scope="session")
def stories(stories_dir):
    """(model, tokenizer) of the real fp32 stories260K Llama."""
    from lowbit.models.loading import load_model

    return load_model(stories_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from lowbit.errors import LowbitError
    from lowbit.models.loading import resolve_model_path

    try:
        return resolve_model_path("smollm2")
    except LowbitError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF."""
    from lowbit.models.gguf_import import load_gguf_as_hf

    return load_gguf_as_hf(smollm2_gguf)


def tiny_llama(hidden: int = 64, intermediate: int = 128, layers: int = 2, vocab: int = 128, seed: int = 0):
    """A random tiny Llama for unit tests (never for quality claims)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()
