"""Llama 3.x rope scaling in GGUF files: llama.cpp stores it as rope_freqs.weight (per-frequency divisors) and no
metadata. lowbit exports a llama3-scaled model with that tensor, and reads such files back into rope parameters
that reproduce the divisors exactly as transformers computes them (float import, kept quantized, engine only);
files whose divisors fit no llama3 curve, or are not finite, or are not head_dim / 2 long, are refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.errors import CorruptFile
from lowbit.formats.gguf import TensorToWrite, export_gguf, read_gguf
from lowbit.models.gguf_import import load_gguf_as_hf
from lowbit.models.loading import load_model
from lowbit.models.rope_scaling import ORIGINAL_CONTEXT_KEY, ROPE_FREQS, default_inv_freq, rope_divisors
from lowbit.models.skeleton import EngineSkeleton

from arch_models import tiny_model, tiny_tokenizer
from fuzzing import rewrite_gguf

# head_dim 16 and rope base 5e5 give wavelengths 6.3, 32, 167, 862 ... positions: an original context of 64 keeps
# the first (< 64 / 4), ramps the second and divides the rest by 8 (test_every_region_is_exercised)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 500000.0}
# Llama 3.1 / 3.2 / 3.3 as released (config.json), with their 128-wide heads: several frequencies on the ramp
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
PROMPT = [5, 17, 33, 62, 9, 41, 77, 12]
STEPS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, config = tiny_model("llama", rope_parameters=dict(LLAMA3), max_position_embeddings=256)
    path = export_gguf(model, tiny_tokenizer(), tmp_path_factory.mktemp("rope") / "llama3.gguf", type="Q8_0",
                       progress=False)
    return model, config, path


def _wavelengths(config) -> torch.Tensor:
    return 2 * math.pi / default_inv_freq(config.rope_parameters["rope_theta"], config.head_dim)


def test_every_region_is_exercised(exported):
    _, config, _ = exported
    wavelength = _wavelengths(config)
    original = LLAMA3["original_max_position_embeddings"]
    short, long = original / LLAMA3["high_freq_factor"], original / LLAMA3["low_freq_factor"]
    assert (wavelength < short).sum() >= 1 and (wavelength > long).sum() >= 1
    assert ((wavelength >= short) & (wavelength <= long)).sum() >= 1


def test_export_writes_transformers_divisors(exported):
    """rope_freqs.weight is float32 and holds, bit for bit, transformers' unscaled over scaled inverse frequencies
    (the scaled ones read from the model's own rotary module)."""
    model, config, path = exported
    gf = read_gguf(path)
    tensor = gf.tensors[ROPE_FREQS]
    assert tensor.type_name == "F32" and tuple(tensor.shape) == (config.head_dim // 2,)
    expected = default_inv_freq(LLAMA3["rope_theta"], config.head_dim) / model.model.rotary_emb.inv_freq
    assert torch.equal(torch.from_numpy(np.array(tensor.to_float())), expected)
    assert torch.equal(expected, rope_divisors(config))
    values = expected.tolist()
    assert values[0] == 1.0 and 1.0 < values[1] < 8.0 and values[2:] == [8.0] * 6
    assert gf.metadata[f"llama.{ORIGINAL_CONTEXT_KEY}"] == 64


def test_three_loads_reproduce_the_rope_parameters_bit_exact(exported):
    """Float import, kept quantized and engine only all get the exported rope parameters back (the single frequency on
    the ramp only fixes the band with Llama 3's high = 4 x low, tried first), so every inverse frequency and rotary
    table is bit for bit the original model's."""
    model, config, path = exported
    imported, _ = load_gguf_as_hf(path)
    kept, _ = load_model(path, keep_quantized=True)
    engine_only, _ = load_model(path, keep_quantized=True, engine_only=True)
    assert isinstance(engine_only, EngineSkeleton) and not isinstance(kept, EngineSkeleton)
    for loaded in (imported, kept, engine_only):
        assert loaded.config.rope_parameters == LLAMA3
    assert torch.equal(imported.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(kept.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(engine_only.model.rotary_emb.tables[None][0], model.model.rotary_emb.inv_freq)


def _greedy(model) -> tuple[list[int], torch.Tensor]:
    """24 greedy tokens after PROMPT and the logits [24, vocab] that chose them: the first from the prefill, the
    others from decode steps (float32 activations, so the only difference from a float forward is rounding)."""
    engine = Engine(model, context=64, prefill_attention_dtype=torch.float32, activations="float32")
    logits = [engine.logits(PROMPT)[-1]]
    sequence = engine.start(PROMPT, SamplingParams(max_new_tokens=STEPS + 1, temperature=0.0), stop_on_eos=False)
    tokens = [sequence.generated[0]]
    for step in range(STEPS - 1):
        row = engine.decoder.decode(torch.tensor([tokens[-1]]), torch.tensor([sequence.slot]),
                                    torch.tensor([len(PROMPT) + step]))[0]
        tokens.append(int(row.argmax()))
        logits.append(row)
    return tokens, torch.stack(logits)


def test_engine_equal_across_loads_and_agrees_with_transformers(exported):
    """Kept quantized and engine only: the same 24 greedy tokens and bit-identical logits; transformers' forward of
    the float import (the same dequantized weights and rope) picks the same tokens, with the decode steps' logits
    within float32 rounding (a few 1e-5 of the largest logit through two layers of <= 128-term dot products; 1e-4
    is the margin, as in test_compiled_families)."""
    _, _, path = exported
    kept_tokens, kept_logits = _greedy(load_model(path, keep_quantized=True)[0])
    only_tokens, only_logits = _greedy(load_model(path, keep_quantized=True, engine_only=True)[0])
    assert kept_tokens == only_tokens and len(kept_tokens) == STEPS
    assert torch.equal(kept_logits, only_logits)
    imported, _ = load_gguf_as_hf(path)
    with torch.no_grad():
        reference = imported(torch.tensor([PROMPT + kept_tokens])).logits[0, len(PROMPT) - 1:-1]
    assert kept_tokens == reference.argmax(-1).tolist()
    error = (kept_logits[1:] - reference[1:]).abs().max()
    print(f"decode logits vs transformers: max |diff| {error:.3g}, largest logit {reference.abs().max():.3g}")
    assert error <= 1e-4 * reference.abs().max()


def _converted_file(folder, head_dim: int, rope: dict, divisors: np.ndarray | None = None):
    """(model, config, path): a llama file as convert_hf_to_gguf writes Llama 3.x: rope_freqs (lowbit's, or
    `divisors`) and no original context in the metadata."""
    model, config = tiny_model("llama", head_dim=head_dim, rope_parameters=dict(rope), max_position_embeddings=16384)
    path = export_gguf(model, tiny_tokenizer(), folder / "exported.gguf", type="F32", progress=False)
    replace = {} if divisors is None else {ROPE_FREQS: TensorToWrite(ROPE_FREQS, "F32", divisors.shape, divisors)}
    return model, config, rewrite_gguf(path, folder / "converted.gguf", replace=replace,
                                       drop_keys=(f"llama.{ORIGINAL_CONTEXT_KEY}",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return _converted_file(tmp_path_factory.mktemp("llama31"), 128, LLAMA31)


def test_llama_cpp_style_file_gives_llama31_parameters(converted):
    """128-wide heads put several frequencies on the ramp, which determine the band; with the default original
    context of 8192 the parameters are Llama 3.1's exactly, and so is every inverse frequency."""
    model, _, path = converted
    divisors = np.array(read_gguf(path).tensors[ROPE_FREQS].to_float())
    assert ((divisors > 1) & (divisors < 8)).sum() >= 2
    imported, _ = load_gguf_as_hf(path)
    assert imported.config.rope_parameters == LLAMA31
    assert torch.equal(imported.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def converter_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """The divisors by convert_hf_to_gguf's own arithmetic (LlamaModel.generate_extra_tensors: float32 frequencies,
    each divisor from its wavelength), written here from its formula: not transformers' computation."""
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.mark.parametrize("head_dim, factor", [(64, 32.0), (128, 8.0)], ids=["llama-3.2-1b", "llama-3.1-8b"])
def test_divisors_by_llama_cpp_arithmetic_give_the_release_parameters(tmp_path, head_dim, factor):
    """Llama 3.2 1B (64-wide heads, factor 32) and Llama 3.1 8B (128, factor 8) as llama.cpp converts them: the
    derived parameters are the released config's exactly, and transformers' divisors of them are the file's
    within float32 rounding."""
    rope = {**LLAMA31, "factor": factor}
    divisors = converter_divisors(rope["rope_theta"], head_dim, factor, 1.0, 4.0, 8192)
    _, config, path = _converted_file(tmp_path, head_dim, rope, divisors)
    imported, _ = load_gguf_as_hf(path)
    assert imported.config.rope_parameters == rope
    np.testing.assert_allclose(rope_divisors(imported.config).numpy(), divisors, rtol=1e-6, atol=0)


def test_all_ones_is_default_rope(exported, tmp_path):
    _, config, path = exported
    ones = TensorToWrite(ROPE_FREQS, "F32", (config.head_dim // 2,), np.ones(config.head_dim // 2, np.float32))
    plain = rewrite_gguf(path, tmp_path / "ones.gguf", replace={ROPE_FREQS: ones})
    imported, _ = load_gguf_as_hf(plain)
    assert imported.config.rope_parameters == {"rope_type": "default", "rope_theta": LLAMA3["rope_theta"]}


def _with_divisors(path, out, values) -> str:
    values = np.asarray(values, dtype=np.float32)
    return rewrite_gguf(path, out, replace={ROPE_FREQS: TensorToWrite(ROPE_FREQS, "F32", values.shape, values)})


def _first_on_ramp(divisors: np.ndarray) -> int:
    return int(np.flatnonzero((divisors > 1) & (divisors < divisors.max()))[0])


@pytest.mark.parametrize("file, edit", [
    ("llama3", lambda d: {4: 5.0}),                        # a second ramp value beyond divided frequencies
    ("llama3", lambda d: {7: 9.0}),                        # one divisor above `factor`: the others off the ramp
    ("llama3", lambda d: {2: 2.0}),                        # ramp values growing with frequency
    ("llama31", lambda d: {_first_on_ramp(d) + 1: d[_first_on_ramp(d) + 1] * 1.01}),   # a bent ramp
    ("llama31", lambda d: {0: 1.01}),                      # a kept frequency divided
], ids=["second-ramp", "above-factor", "reversed", "bent-ramp", "kept-divided"])
def test_divisors_off_every_llama3_curve_are_refused(exported, converted, tmp_path, file, edit):
    """One edited divisor: one line naming the file and what does not fit, from every loader. (A single value on
    the ramp, or two, always fit some curve: those edits are not refusable.)"""
    _, config, path = exported if file == "llama3" else converted
    divisors = rope_divisors(config).numpy().copy()
    for index, value in edit(divisors).items():
        divisors[index] = value
    bad = _with_divisors(path, tmp_path / "bad.gguf", divisors)
    for load in (load_gguf_as_hf, lambda p: load_model(p, keep_quantized=True),
                 lambda p: load_model(p, keep_quantized=True, engine_only=True)):
        with pytest.raises(CorruptFile, match=r"bad\.gguf: rope_freqs\.weight fits no llama3 rope scaling: ") as info:
            load(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("values, message", [
    ([1.0, float("nan"), 8, 8, 8, 8, 8, 8], r"rope_freqs\.weight\[1\] is nan"),
    ([1.0, 2.0, 8, 8, 8, 8, 8, float("inf")], r"rope_freqs\.weight\[7\] is inf"),
    ([1.0, 0.5, 8, 8, 8, 8, 8, 8], r"rope_freqs\.weight\[1\] is 0\.5; frequency divisors are finite and at least 1"),
    ([1.0, 2.0, 8, 8, 8, 8, 8], r"tensor rope_freqs\.weight has shape \[7\], but .* need \[8\]"),
])
def test_malformed_rope_freqs_are_refused(exported, tmp_path, values, message):
    _, _, path = exported
    bad = _with_divisors(path, tmp_path / "bad.gguf", values)
    with pytest.raises(CorruptFile, match=message):
        load_gguf_as_hf(bad)
    with pytest.raises(CorruptFile, match=message):
        load_model(bad, keep_quantized=True, engine_only=True)


@pytest.mark.parametrize("theta", [0.0, 1.0, float("nan")])
def test_a_rope_base_without_frequencies_is_refused(exported, tmp_path, theta):
    _, _, path = exported
    bad = rewrite_gguf(path, tmp_path / "bad.gguf", meta={"llama.rope.freq_base": theta})
    with pytest.raises(CorruptFile, match=r"llama\.rope\.freq_base is .*; rope frequencies need a finite base above 1"):
        load_gguf_as_hf(bad)


def test_other_rope_scaling_is_still_refused_on_export(tmp_path):
    from lowbit.errors import UnsupportedArchitecture

    model, _ = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedArchitecture, match="rope scaling .* is not supported by lowbit's GGUF export yet"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "linear.gguf", type="Q8_0", progress=False)


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_lowbit_on_llama3_file(tmp_path):
    """llama.cpp reads rope_freqs as lowbit writes it: on an F32 export its greedy choice at every position of the
    prompt and lowbit's tokens is lowbit's, its logits match to summation order, and they are far from what the
    same weights give without the scaling (the tensor is what makes them agree)."""
    from test_gguf_interop import _llama_cpp, llama_cpp_logits

    llama_cpp = _llama_cpp()
    model, _ = tiny_model("llama", rope_parameters=dict(LLAMA3), max_position_embeddings=256)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "llama3.gguf", type="F32", progress=False)
    tokens, logits = _greedy(load_model(path, keep_quantized=True)[0])
    tokens, logits = tokens[:8], logits[:8]
    ids = PROMPT + tokens
    theirs = torch.from_numpy(llama_cpp_logits(llama_cpp, path, ids))[len(PROMPT) - 1:-1]
    assert theirs.argmax(-1).tolist() == tokens
    spread = float(logits.std())
    assert (theirs - logits).abs().max() < 0.01 * spread
    unscaled, _ = tiny_model("llama", max_position_embeddings=256, rope_theta=LLAMA3["rope_theta"])
    with torch.no_grad():
        plain = unscaled(torch.tensor([ids])).logits[0, len(PROMPT) - 1:-1]
    print(f"llama.cpp vs lowbit: {(theirs - logits).abs().max():.3g}, vs unscaled rope: "
          f"{(theirs - plain).abs().max():.3g}, logit std {spread:.3g}")
    assert (theirs - plain).abs().max() > 0.1 * spread
