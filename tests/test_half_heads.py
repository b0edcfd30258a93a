"""Embeddings and heads kept in their checkpoint's half dtype (models/float_dtype.py): lowbit's writer stores them
as bfloat16 / float16 when the source was, loading keeps them so, and every number computed from them is the one
the same values in float32 give (transformers on the dequantized weights is the reference)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.errors import LowbitError
from lowbit.formats.native import WEIGHTS, NativeOptions, load_native, save_native
from lowbit.methods.base import QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.models.float_dtype import HalfWeightLinear
from lowbit.runtime import clib
from lowbit.runtime.surgery import dequantized_copy

from conftest import tiny_llama


def _bf16_source_model(tied: bool) -> torch.nn.Module:
    """A tiny RTN-4 Llama whose embedding and head hold bfloat16 values, as if loaded (as float32) from a bfloat16
    checkpoint."""
    model = tiny_llama(vocab=300)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in (model.model.embed_tokens, model.lm_head):
        module.weight.data = module.weight.data.bfloat16().float()
    quantize_model(model, QuantizeConfig(bits=4, group_size=32), progress=False)
    model.lowbit_source_dtype = torch.bfloat16
    return model


def _stored_dtypes(folder) -> dict[str, torch.dtype]:
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}


def transformers_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_keeps_bfloat16_and_greedy_matches_transformers(tmp_path, tied):
    model = _bf16_source_model(tied)
    save_native(model, None, tmp_path / "q")
    stored = _stored_dtypes(tmp_path / "q")
    assert stored["model.embed_tokens.weight"] == "BF16"
    assert ("lm_head.weight" not in stored) if tied else stored["lm_head.weight"] == "BF16"
    assert stored["model.norm.weight"] == "F32"          # small tensors stay float32
    loaded, _ = load_native(tmp_path / "q")
    embed, head = loaded.model.embed_tokens.weight, loaded.lm_head.weight
    assert embed.dtype == head.dtype == torch.bfloat16 and (embed.data_ptr() == head.data_ptr()) == tied
    assert isinstance(loaded.lm_head, HalfWeightLinear)
    assert torch.equal(embed.float(), model.model.embed_tokens.weight)
    prompt = [5, 17, 250, 3]
    with torch.no_grad():            # the same numbers as the float32 model saved (to float32 rounding)
        ids = torch.tensor([prompt])
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    reference = dequantized_copy(model)                  # float32 weights of the same values
    expected = transformers_greedy(reference, prompt, 16)
    engine = Engine(loaded, context=64)
    assert (engine.decoder.native is not None) == (clib.native_library() is not None)
    if engine.decoder.native is not None:
        assert engine.decoder.native.spec.lm_head.kind == clib.LB_BF16
    got = list(engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0.0), stop_on_eos=False))
    assert got == expected
    save_native(copy.deepcopy(loaded), None, tmp_path / "again")     # re-saving keeps the half dtype
    assert _stored_dtypes(tmp_path / "again")["model.embed_tokens.weight"] == "BF16"


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_and_awq_keep_bfloat16_embedding_and_head(tmp_path, fmt):
    from lowbit.formats.registry import get_writer
    from lowbit.models.loading import load_model

    model = _bf16_source_model(tied=False)
    get_writer(fmt).save(model, None, tmp_path / fmt)
    stored = _stored_dtypes(tmp_path / fmt)
    assert stored["model.embed_tokens.weight"] == stored["lm_head.weight"] == "BF16"
    loaded, _ = load_model(tmp_path / fmt)
    assert loaded.model.embed_tokens.weight.dtype == loaded.lm_head.weight.dtype == torch.bfloat16
    prompt = [5, 17, 250, 3]
    got = list(Engine(loaded, context=64).generate(prompt, SamplingParams(max_new_tokens=16, temperature=0.0),
                                                   stop_on_eos=False))
    reference = dequantized_copy(loaded)     # plain transformers modules on float32 copies of the same values
    reference.model.embed_tokens = torch.nn.Embedding.from_pretrained(loaded.model.embed_tokens.weight.float())
    reference.lm_head = torch.nn.Linear(64, 300, bias=False)
    reference.lm_head.weight.data = loaded.lm_head.weight.detach().float()
    assert got == transformers_greedy(reference, prompt, 16)


def test_float_dtype_option(tmp_path):
    model = _bf16_source_model(tied=False)
    save_native(model, None, tmp_path / "f32", NativeOptions(float_dtype="float32"))
    assert _stored_dtypes(tmp_path / "f32")["model.embed_tokens.weight"] == "F32"
    save_native(model, None, tmp_path / "f16", NativeOptions(float_dtype="float16"))
    assert _stored_dtypes(tmp_path / "f16")["lm_head.weight"] == "F16"
    model.model.embed_tokens.weight.data += 1e-3         # no longer bfloat16 values: "source" keeps them exact
    save_native(model, None, tmp_path / "changed")
    assert _stored_dtypes(tmp_path / "changed")["model.embed_tokens.weight"] == "F32"
    with pytest.raises(LowbitError, match="float_dtype 'half' unknown"):
        NativeOptions(float_dtype="half")


def test_hf_folder_records_its_source_dtype(tmp_path):
    from lowbit.models.loading import load_hf_folder

    model = tiny_llama(vocab=300).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    loaded, _ = load_hf_folder(tmp_path / "hf")
    assert loaded.model.embed_tokens.weight.dtype == torch.float32 and loaded.lowbit_source_dtype == torch.bfloat16


def test_cli_quantize_keeps_a_bfloat16_source_and_takes_float_dtype(tmp_path, capsys):
    from lowbit.cli import main

    tiny_llama(vocab=300).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    for extra, expected in (([], "BF16"), (["--float-dtype", "float32"], "F32")):
        out = tmp_path / f"q{len(extra)}"
        assert main(["-q", "quantize", str(tmp_path / "hf"), "-o", str(out), "--bits", "4", "--group-size", "32",
                     *extra]) == 0
        assert _stored_dtypes(out)["model.embed_tokens.weight"] == expected
    code = main(["-q", "quantize", str(tmp_path / "hf"), "-o", str(tmp_path / "g"), "--format", "gptq",
                 "--float-dtype", "bfloat16"])
    assert code != 0 and "has no option 'float_dtype'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("rows", [1, 40])
def test_half_linear_is_float32_arithmetic_of_its_values_for_few_and_many_rows(rows, monkeypatch):
    import lowbit.runtime.fast_kernels as fast_kernels

    monkeypatch.setattr(fast_kernels, "PREFILL_SLICE_ROWS", 7)     # several slices, the last one short
    layer = torch.nn.Linear(96, 30)
    layer.weight.data = layer.weight.data.bfloat16()
    layer.__class__ = HalfWeightLinear
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.float().t() + layer.bias, rtol=1e-5, atol=1e-5)
