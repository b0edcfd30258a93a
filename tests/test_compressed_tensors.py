"""compressed-tensors: lowbit writes what transformers loads (same logits), and reads what compressed-tensors'
own compressors write with the dequantized weights compressed-tensors itself computes (bit-exact)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from lowbit.api import quantize, save
from lowbit.errors import LowbitError
from lowbit.models.loading import load_model
from lowbit.runtime.surgery import quantized_modules

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                         "'lowbit[compressed-tensors]')")


def _logits(model, ids):
    from lowbit.runtime.cpu import float32_arithmetic

    with torch.no_grad(), float32_arithmetic():   # lowbit's dequantized weights, not its bf16 fast kernels
        return model(ids).logits.float()


def _transformers(path, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


# (method, bits, symmetric, what the file's config group must say)
CASES = [
    ("rtn", 4, True, {"format": "pack-quantized", "num_bits": 4, "symmetric": True, "strategy": "group"}),
    ("rtn", 4, False, {"format": "pack-quantized", "num_bits": 4, "symmetric": False, "strategy": "group"}),
    ("rtn", 8, True, {"format": "pack-quantized", "num_bits": 8, "symmetric": True, "strategy": "group"}),
    ("dynamic-int8", 8, True, {"format": "int-quantized", "num_bits": 8, "symmetric": True, "strategy": "channel",
                               "activations": False}),
]


@pytest.mark.parametrize("method,bits,symmetric,expect", CASES, ids=lambda c: str(c) if not isinstance(c, dict) else "")
def test_lowbit_to_transformers_and_back(tmp_path, method, bits, symmetric, expect):
    model = tiny_llama()
    quantize(model, method=method, bits=bits, group_size=32, symmetric=symmetric, progress=False)
    out = save(model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert group["format"] == expect["format"] and qc["ignore"] == ["lm_head"]
    for key in ("num_bits", "symmetric", "strategy"):
        assert group["weights"][key] == expect[key]
    if "activations" in expect:   # dynamic-int8 = per-token asymmetric int8 activations (W8A8)
        assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
        assert group["input_activations"]["symmetric"] == expect["activations"]

    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    # transformers loads asymmetric pack-quantized files only through its dequantize route (its compressed route
    # builds an unpacked zero-point parameter and then refuses the packed one: compressed-tensors 0.20)
    hf = _transformers(out, dequantize=not symmetric)
    expected = _logits(model, ids)
    # Same weights up to float32 rounding of the scale product (int8 rows: SCB/127 vs scale); logits within 1e-5
    assert (_logits(hf, ids) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()

    back, _ = load_model(out)
    for (name, a), (_, b) in zip(quantized_modules(model), quantized_modules(back)):
        wa, wb = a.qweight.dequantize(), b.qweight.dequantize()
        if method == "dynamic-int8":
            # lowbit's int8 rows dequantize as (CB * SCB) * (1/127), compressed-tensors' as CB * fl(SCB / 127):
            # four float32 roundings of 2^-24 each at most
            assert torch.allclose(wa, wb, rtol=2 ** -22, atol=0), name
            assert torch.equal(a.qweight.codes, b.qweight.codes), name
        else:
            assert torch.equal(wa, wb), name
            assert torch.equal(a.qweight.codes, b.qweight.codes), name


def _ct_made_checkpoint(path, symmetric: bool, bits: int, group_size: int | None):
    """A checkpoint written by compressed-tensors itself (what llm-compressor does after calibrating): scales and
    zero points from compressed-tensors' calculate_qparams, compressed by its ModelCompressor, saved by
    transformers."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama(seed=3)
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, config)
    for _, module in model.named_modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            grouped = w.reshape(w.shape[0], -1, group_size or w.shape[1])
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


@pytest.mark.parametrize("symmetric,bits,group_size", [(False, 4, 32), (True, 4, 32), (True, 8, None),
                                                       (False, 8, 16)])
def test_reads_compressed_tensors_files_bit_exact(tmp_path, symmetric, bits, group_size):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    path = _ct_made_checkpoint(tmp_path / "ct", symmetric, bits, group_size)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    tensors = load_file(str(path / "model.safetensors"))
    model, _ = load_model(path)
    layers = dict(quantized_modules(model))
    assert len(layers) == 14
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for name, module in layers.items():
        parts = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        reference = compressor.decompress(parts, scheme)["weight"]     # compressed-tensors' own dequantization
        assert torch.equal(module.qweight.dequantize(), reference.float()), name


def test_writer_rejects_what_the_format_cannot_hold(tmp_path):
    model = tiny_llama()
    quantize(model, method="nf4", progress=False)
    with pytest.raises(LowbitError, match="no NF4"):
        save(model, tmp_path / "nf4", format="compressed-tensors")
    model = tiny_llama()
    quantize(model, method="rtn", bits=4, group_size=48, progress=False)   # 48 does not divide 64
    with pytest.raises(LowbitError, match="does not divide"):
        save(model, tmp_path / "g48", format="compressed-tensors")
    with pytest.raises(LowbitError, match="has no option 'bits'"):
        save(model, tmp_path / "x", format="compressed-tensors", bits=4)
    assert not (tmp_path / "nf4").exists() and not (tmp_path / "g48").exists()


def test_float16_file_for_vllm(tmp_path):
    """dtype=float16 casts the unquantized tensors and the (fp16-exact) scales; the codes do not change."""
    model = tiny_llama()
    quantize(model, method="rtn", bits=4, group_size=32, progress=False)
    out = save(model, tmp_path / "fp16", format="compressed-tensors", dtype="float16")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    back, _ = load_model(out)
    for (name, a), (_, b) in zip(quantized_modules(model), quantized_modules(back)):
        assert torch.equal(a.qweight.dequantize(), b.qweight.dequantize()), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_codes_on_a_real_model(stories_dir, tmp_path, method):
    """GPTQ's and AWQ's codes (per channel: stories260K's 172-wide MLP has no dividing group size) load in
    transformers with the logits of lowbit's dequantized model."""
    model, tokenizer = load_model(stories_dir)
    from lowbit.methods.base import CalibrationRequest

    quantize(model, method=method, bits=4, group_size=-1, symmetric=method == "gptq", progress=False,
             calibration=CalibrationRequest(tokenizer, None, 8, 64, 0))
    out = save(model, tmp_path / method, format="compressed-tensors", tokenizer=tokenizer)
    ids = tokenizer("Once upon a time there was a little", return_tensors="pt").input_ids
    expected = _logits(model, ids)
    hf = _transformers(out, dequantize=method != "gptq")
    assert (_logits(hf, ids) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_inspect_lists_runtimes_and_gptq_warns_for_vllm(stories_dir, tmp_path, capsys, caplog):
    from lowbit.cli import main

    out = tmp_path / "gptq-asym"
    with caplog.at_level("WARNING", logger="lowbit"):
        assert main(["quantize", str(stories_dir), "-o", str(out), "--format", "gptq", "--asym",
                     "--group-size", "-1", "--skip", "lm_head,mlp"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "vLLM" in r.getMessage()]
    assert any("sym=False" in w for w in warnings) and any("float32" in w for w in warnings)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    runtimes = json.loads(capsys.readouterr().out)["runtimes"]
    assert runtimes["vLLM"].startswith("no:") and "sym=False" in runtimes["vLLM"]
    assert runtimes["transformers"] == "yes" and runtimes["GPTQModel"] == "yes"
    assert runtimes["llama.cpp"].startswith("no:")
