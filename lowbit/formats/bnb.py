"""bitsandbytes checkpoints: the safetensors layout transformers' bitsandbytes integration saves and loads.

4-bit Linear with prefix P: P.weight (uint8 [ceil(N*K/2), 1], two codes per byte, first in the high nibble),
P.weight.absmax (float32, or uint8 codes under double quantization), P.weight.quant_map (the 16 values),
P.weight.nested_absmax / P.weight.nested_quant_map (double quantization), and
P.weight.quant_state.bitsandbytes__nf4|fp4 (uint8 bytes of a JSON with quant_type, blocksize, dtype, shape,
nested_blocksize, nested_dtype, nested_offset).
LLM.int8 Linear: P.weight (int8 [N, K]), P.SCB (float32 [N] row absmax), P.weight_format (uint8 0 = row-major).
config.json carries `quantization_config` with quant_method "bitsandbytes" as transformers writes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError
from lowbit.formats.hf_quantized import read_quantization_config, read_tensors, write_checkpoint
from lowbit.formats.registry import Format, NoOptions, register_format
from lowbit.models.adapters import in_out_features, is_linear
from lowbit.models.validate import (check_float_tensor, check_integer_tensor, check_state, check_state_tensor,
                                    layer_errors)
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.surgery import install_quantized, quantized_modules
from lowbit.schemes.codebook import (Codebook4, codebook, dynamic_map, json_to_uint8, quant_state_json,
                                     uint8_to_json)
from lowbit.schemes.int8row import RowInt8

WEIGHTS = "model.safetensors"
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# -- writing -----------------------------------------------------------------------------------------------
def bnb_layer_tensors(prefix: str, qw: QuantizedWeight, dtype_name: str = "float32") -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes saves for one quantized Linear (without its bias)."""
    scheme = qw.scheme
    if isinstance(scheme, Codebook4):
        out = {f"{prefix}.weight": scheme.pack(qw), f"{prefix}.weight.quant_map": codebook(scheme.quant_type)}
        if scheme.double_quant:
            out[f"{prefix}.weight.absmax"] = qw.extra["absmax_codes"]
            out[f"{prefix}.weight.nested_absmax"] = qw.extra["nested_absmax"]
            out[f"{prefix}.weight.nested_quant_map"] = dynamic_map()
        else:
            out[f"{prefix}.weight.absmax"] = scheme.flat_absmax(qw)
        state = quant_state_json(scheme, qw, dtype_name)
        out[f"{prefix}.weight.{QUANT_STATE_PREFIX}{scheme.quant_type}"] = json_to_uint8(state)
        return out
    if isinstance(scheme, RowInt8):
        return {f"{prefix}.weight": scheme.int8_codes(qw), f"{prefix}.SCB": qw.extra["SCB"].float(),
                f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    raise unstorable(prefix, scheme)


def unstorable(name: str, scheme: Any) -> LowbitError:
    return LowbitError(f"layer {name} uses scheme {scheme.name}, which the bitsandbytes format cannot store; "
                       "quantize with --method nf4, fp4 or int8 for --format bnb")


def quantization_config(schemes: list[Any], skipped: list[str]) -> dict[str, Any]:
    """transformers' BitsAndBytesConfig.to_dict() for these layers (all 4-bit alike, or all LLM.int8)."""
    kinds = {type(s) for s in schemes}
    if len(kinds) != 1:
        raise LowbitError("the bitsandbytes format holds either 4-bit or int8 layers, not both; quantize all "
                          "layers with one method")
    first = schemes[0]
    if isinstance(first, RowInt8) and any(s.activations != "int8" for s in schemes):
        raise LowbitError("dynamic-int8 layers have no bitsandbytes equivalent; save them in lowbit's format "
                          "(--format lowbit) or quantize with --method int8")
    if isinstance(first, Codebook4):
        variants = {(s.quant_type, s.double_quant, s.compute_dtype) for s in schemes}
        if len(variants) != 1:
            raise LowbitError(f"4-bit layers differ in type/double quant/compute dtype ({sorted(variants)}); "
                              "bitsandbytes' config allows one setting for the whole model")
    is4 = isinstance(first, Codebook4)
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": is4, "_load_in_8bit": not is4, "load_in_4bit": is4, "load_in_8bit": not is4,
        "bnb_4bit_compute_dtype": first.compute_dtype if is4 else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": first.quant_type if is4 else "fp4",
        "bnb_4bit_use_double_quant": bool(first.double_quant) if is4 else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skipped or None,
        "llm_int8_threshold": 6.0 if is4 else float(first.threshold),
    }


def save_bnb(model: nn.Module, tokenizer: Any, out: str | Path, options: NoOptions | None = None) -> Path:
    """Write a quantized model as a bitsandbytes checkpoint folder (atomically)."""
    quantized = dict(quantized_modules(model))
    if not quantized:
        raise LowbitError("the model has no quantized layers; quantize it with --method nf4, fp4 or int8 "
                          "before saving with --format bnb")
    for name, module in quantized.items():
        if not isinstance(module.qweight.scheme, (Codebook4, RowInt8)):
            raise unstorable(name, module.qweight.scheme)
    dtype_name = _DTYPE_NAMES.get(getattr(model, "dtype", torch.float32), "float32")
    skipped = [name for name, module in model.named_modules() if is_linear(module) and name not in quantized]

    def layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {key[len(name) + 1:]: value for key, value in bnb_layer_tensors(name, qw, dtype_name).items()}

    return write_checkpoint(model, tokenizer, out, "bnb", layer_tensors,
                            quantization_config([m.qweight.scheme for m in quantized.values()], skipped))


# -- reading -----------------------------------------------------------------------------------------------
def is_bnb(path: Path) -> bool:
    """A folder whose config.json says quant_method 'bitsandbytes'."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    qc = read_quantization_config(path)
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


def _read_4bit(prefix: str, parts: dict[str, torch.Tensor], compute_dtype: str, expected: tuple[int, int]
               ) -> QuantizedWeight:
    state_keys = [k for k in parts if k.startswith(QUANT_STATE_PREFIX)]
    state = uint8_to_json(parts[state_keys[0]])
    n, k = (int(v) for v in state.get("shape", expected))
    if (n, k) != expected:
        raise CorruptFile(f"{prefix}: quant_state shape {(n, k)} does not match the model's layer {expected}")
    nested = "nested_absmax" in parts
    scheme = Codebook4(quant_type=state["quant_type"], blocksize=int(state["blocksize"]), double_quant=nested,
                       compute_dtype=compute_dtype)
    if "quant_map" in parts and not torch.equal(parts["quant_map"].float(), codebook(scheme.quant_type)):
        raise LowbitError(f"{prefix}: the file's 4-bit quant_map differs from bitsandbytes' {scheme.quant_type} "
                          "table; lowbit reads only the standard tables")
    if nested:
        if int(state.get("nested_blocksize", 256)) != scheme.nested_blocksize:
            raise LowbitError(f"{prefix}: nested blocksize {state.get('nested_blocksize')} is not supported "
                              f"(bitsandbytes uses {scheme.nested_blocksize})")
        if "nested_quant_map" in parts and not torch.equal(parts["nested_quant_map"].float(), dynamic_map()):
            raise LowbitError(f"{prefix}: the nested quant_map is not bitsandbytes' dynamic map; unsupported")
        tensors = {"codes": parts["weight"], "extra.absmax_codes": parts["absmax"].to(torch.uint8),
                   "extra.nested_absmax": parts["nested_absmax"].float(),
                   "extra.nested_offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32)}
    else:
        tensors = {"codes": parts["weight"], "scales": parts["absmax"].float()}
    check_integer_tensor(f"{prefix}.weight", parts["weight"], "bitsandbytes checkpoint", (torch.uint8,))
    for key in ("absmax", "nested_absmax", "quant_map", "nested_quant_map"):
        if key in parts and not (key == "absmax" and nested):   # a nested absmax is uint8 codes
            check_float_tensor(f"{prefix}.weight.{key}", parts[key], "bitsandbytes checkpoint")
    if nested:
        check_integer_tensor(f"{prefix}.weight.absmax", parts["absmax"], "bitsandbytes checkpoint", (torch.uint8,))
    if parts["weight"].numel() != -(-n * k // 2):
        raise CorruptFile(f"{prefix}.weight holds {parts['weight'].numel()} bytes, and {n}x{k} 4-bit codes take "
                          f"{-(-n * k // 2)}; the checkpoint is corrupt")
    return scheme.from_tensors(tensors, (n, k), scheme.blocksize)


def load_bnb(path: str | Path, kernel: str = "auto", **_: Any):
    """Load a bitsandbytes checkpoint folder (ours or transformers') -> (model, tokenizer), layers kept quantized."""
    from lowbit.methods.base import QuantizeConfig
    from lowbit.models.loading import empty_model_from_config, load_config, load_tokenizer
    from lowbit.runtime import bnb_kernels  # noqa: F401  (kernels for these schemes)

    path = Path(path)
    config = load_config(path)
    qc = dict(getattr(config, "quantization_config", None) or {})
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain float skeleton; we install the quantized layers ourselves
    model = empty_model_from_config(config)
    tensors = read_tensors(path)
    compute_dtype = str(qc.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", "")
    threshold = qc.get("llm_int8_threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise CorruptFile(f"{path}: llm_int8_threshold {threshold!r} is not a non-negative number; the "
                          "quantization config is corrupt")
    threshold = float(threshold)

    state_marker = ".weight." + QUANT_STATE_PREFIX
    layer_prefixes = {k.split(state_marker)[0] for k in tensors if state_marker in k}
    int8_prefixes = {k[: -len(".SCB")] for k in tensors if k.endswith(".SCB")}
    schemes = []
    for prefix in sorted(layer_prefixes | int8_prefixes):
        try:
            module = model.get_submodule(prefix)
        except AttributeError as exc:
            raise CorruptFile(f"{path}: quantized tensor {prefix} names no layer of a {config.model_type} "
                              "model") from exc
        if not is_linear(module):
            raise CorruptFile(f"{path}: {prefix} is not a Linear layer")
        k_in, n_out = in_out_features(module)
        if prefix in layer_prefixes:
            head = f"{prefix}.weight"
            parts = {key[len(head) + 1:] if key != head else "weight": tensors.pop(key)
                     for key in [key for key in tensors if key == head or key.startswith(head + ".")]}
            with layer_errors(path, prefix):
                qw = _read_4bit(prefix, parts, compute_dtype, (n_out, k_in))
        else:
            cb = tensors.pop(f"{prefix}.weight", None)
            scb = tensors.pop(f"{prefix}.SCB")
            weight_format = tensors.pop(f"{prefix}.weight_format", None)
            if weight_format is not None and int(weight_format.reshape(-1)[0]) != 0:
                raise LowbitError(f"{prefix}: int8 weight format {int(weight_format.reshape(-1)[0])} is a GPU tile "
                                  "layout; only row-major (0) checkpoints can be read")
            if cb is None:
                raise CorruptFile(f"{path}: {prefix}.SCB has no {prefix}.weight next to it; the file is incomplete")
            with layer_errors(path, prefix):
                qw = RowInt8(threshold=threshold, activations="int8").from_tensors(
                    {"CB": cb, "SCB": scb}, (n_out, k_in), -1)
        bias = tensors.pop(f"{prefix}.bias", None)
        new = install_quantized(model, prefix, qw, kernel, source=path)
        if bias is not None:
            check_state_tensor(new, "bias", bias, path, prefix)
            new.bias = nn.Parameter(bias.float(), requires_grad=False)
        schemes.append(qw.scheme)
    if not schemes:
        raise CorruptFile(f"{path}: config.json says bitsandbytes but no quantized tensors were found")
    check_state(model, tensors, path, skip_prefixes=layer_prefixes | int8_prefixes)
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tensors = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    model.eval()
    first = schemes[0]
    if isinstance(first, Codebook4):
        model.lowbit_config = QuantizeConfig(method=first.quant_type, bits=4, group_size=first.blocksize, options={
            "blocksize": first.blocksize, "double_quant": first.double_quant, "compute_dtype": first.compute_dtype})
    else:
        model.lowbit_config = QuantizeConfig(method="int8", bits=8, group_size=-1, options={"threshold": threshold})
    return model, load_tokenizer(path)


register_format(Format("bnb", write=save_bnb, can_read=is_bnb, read=load_bnb,
                       description="bitsandbytes safetensors (nf4/fp4 [+double quant], LLM.int8) for transformers"))
