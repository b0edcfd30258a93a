"""lowbit's own format: an HF folder (config, tokenizer) + model.safetensors + lowbit.json.

Quantized layers are stored as their scheme's tensors under the layer's name (`NAME.codes`, `NAME.scales`,
...), described in lowbit.json (scheme config, shape, group size), so loading rebuilds each QuantizedWeight
exactly and the loaded model computes bit-identically to the saved one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import CorruptFile
from lowbit.models.validate import (SCHEME_TENSOR_NAMES, check_integer_tensor, check_not_bool, check_part_names,
                                    check_state, check_state_tensor, layer_errors)
from lowbit.formats.atomic import atomic_dir
from lowbit.formats.hf_quantized import layer_tensors, read_checkpoint
from lowbit.formats.registry import Format, register_format
from lowbit.models.float_dtype import check_float_dtype, keep_half_weights, stored_float_tensors
from lowbit.runtime.surgery import install_quantized, quantized_modules
from lowbit.schemes.base import scheme_from_config

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
# how Scheme.to_tensors stores statistics: float, or uint8 when every value is an integer 0..255 (_compact_float)
STATISTICS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def save_hf_side_files(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """config.json, generation_config.json and tokenizer files, as transformers writes them."""
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(out)
        except Exception:  # an invalid generation config must not block saving the weights
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def unquantized_tensors(model: nn.Module, quantized_names) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State-dict tensors outside the quantized layers, each storage once (as transformers stores tied
    weights), and {dropped key: the key holding its storage}."""
    prefixes = tuple(f"{n}." for n in quantized_names)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        if value.numel() and value.data_ptr() in seen:
            tied[key] = seen[value.data_ptr()]
            continue
        seen[value.data_ptr()] = key
        tensors[key] = value.detach().contiguous()
    return tensors, tied


@dataclass(frozen=True)
class NativeOptions:
    """float_dtype: the dtype of the embedding and head weights outside quantized layers (models/float_dtype.py):
    "source" (the dtype of the checkpoint the model was loaded from, where the values survive it unchanged),
    "float32", "float16" or "bfloat16" (converted, rounding if narrower)."""

    float_dtype: str = "source"

    def __post_init__(self):
        check_float_dtype(self.float_dtype)


def save_native(model: nn.Module, tokenizer: Any, out: str | Path, options: NativeOptions | None = None) -> Path:
    """Write `model` (quantized or not) to folder `out` in lowbit's format, atomically."""
    out = Path(out)
    options = options or NativeOptions()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quantized = dict(quantized_modules(model))
    for name, module in quantized.items():
        qw = module.qweight
        for key, value in qw.scheme.to_tensors(qw).items():
            tensors[f"{name}.{key}"] = value.contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().contiguous()
        layers[name] = {"scheme": qw.scheme.to_config(), "shape": list(qw.shape), "group_size": qw.group_size}
    floats, tied = unquantized_tensors(model, quantized)
    tensors.update(stored_float_tensors(model, floats, options.float_dtype))
    config = getattr(model, "lowbit_config", None)
    manifest = {"format": "lowbit", "version": FORMAT_VERSION,
                "quantization": config.to_dict() if config is not None else None,
                "layers": layers, "tied": tied}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        save_hf_side_files(model, tokenizer, tmp)
    return out


def is_native(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{file} is unreadable ({exc}); re-save the model with lowbit") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise CorruptFile(f"{file} is not a lowbit manifest (a JSON object with format 'lowbit'); re-save the model")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CorruptFile(f"{file}: version {version!r} is not a lowbit manifest version this lowbit reads "
                          f"(1..{FORMAT_VERSION}); upgrade lowbit or re-save the model")
    layers, tied = manifest.get("layers"), manifest.get("tied", {})
    if not isinstance(layers, dict) or not isinstance(tied, dict):
        raise CorruptFile(f"{file}: 'layers' and 'tied' must be JSON objects; the manifest is corrupt")
    for name, spec in layers.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if (not isinstance(spec.get("scheme") if isinstance(spec, dict) else None, dict) or not isinstance(shape, list)
                or len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or not isinstance(spec.get("group_size"), int) or isinstance(spec.get("group_size"), bool)):
            raise CorruptFile(f"{file}: layer {name} needs a scheme object, a [out, in] shape and an integer "
                              "group_size; the manifest is corrupt")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CorruptFile(f"{file}: 'tied' must map tensor names to tensor names; the manifest is corrupt")
    quantization = manifest.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise CorruptFile(f"{file}: 'quantization' must be a JSON object or null; the manifest is corrupt")
    return manifest


def load_native(path: str | Path, kernel: str = "auto", **_: Any):
    """Load a lowbit folder -> (model, tokenizer); quantized layers come back as QuantLinear modules."""
    from lowbit.methods.base import QuantizeConfig
    from lowbit.models.loading import empty_model_from_config, load_tokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if not (path / WEIGHTS).is_file():
        raise CorruptFile(f"{path} has no {WEIGHTS}; the lowbit checkpoint is incomplete")
    tensors, deferred = read_checkpoint(path, layer_tensors(manifest["layers"]))
    model = empty_model_from_config(path)
    unknown = [name for name in manifest["layers"] if not _is_linear_like(model, name)]
    if unknown:
        raise CorruptFile(f"{path / MANIFEST} names quantized layers the {model.config.model_type} model does not "
                          f"have: {unknown[:3]}; the manifest does not match config.json")
    for name, spec in manifest["layers"].items():
        parts = deferred.take(f"{name}.")     # read now: one layer's file bytes at a time, freed once converted
        bias = parts.pop("bias", None)
        if "codes" not in parts and not parts:
            raise CorruptFile(f"{path / WEIGHTS} has no tensors for quantized layer {name}")
        check_part_names(name, parts, SCHEME_TENSOR_NAMES, path / WEIGHTS, allowed_prefix="extra.")
        for part, tensor in parts.items():   # codes and statistics are numbers: a bool tensor reads 0/1 silently
            if part in ("codes", "g_idx", "blocks", "CB"):
                check_integer_tensor(f"{name}.{part}", tensor, path / WEIGHTS)
            elif part in ("scales", "zeros") and tensor.dtype not in STATISTICS_DTYPES:
                raise CorruptFile(f"{path / WEIGHTS}: tensor {name}.{part} is stored as {tensor.dtype}, not a float "
                                  "or uint8 (lowbit's exact compact form); the checkpoint is corrupt")
            else:
                check_not_bool(f"{name}.{part}", tensor, path / WEIGHTS)
        with layer_errors(path / WEIGHTS, name):
            qw = scheme_from_config(spec["scheme"]).from_tensors(parts, tuple(spec["shape"]), spec["group_size"])
        module = install_quantized(model, name, qw, kernel, source=path / WEIGHTS)
        if bias is not None:
            check_state_tensor(module, "bias", bias, path / WEIGHTS, name)
            module.bias = nn.Parameter(bias, requires_grad=False)
    for key, source in manifest["tied"].items():
        if source not in tensors:
            raise CorruptFile(f"{path / MANIFEST}: tied tensor {key} names {source}, which the weights do not hold")
        tensors[key] = tensors[source]
    check_state(model, tensors, path / WEIGHTS, skip_prefixes=manifest["layers"])
    model.load_state_dict(tensors, strict=False, assign=True)   # (assign: a bfloat16 embedding stays one)
    if not manifest.get("tied"):
        model.tie_weights()  # tied pairs were stored once and assigned above; otherwise follow the config
    keep_half_weights(model)
    model.eval()
    if manifest.get("quantization"):
        model.lowbit_config = QuantizeConfig.from_dict(manifest["quantization"])
    return model, load_tokenizer(path)


def _is_linear_like(model: nn.Module, name: str) -> bool:
    from lowbit.models.validate import module_weight_shape

    try:
        return module_weight_shape(model.get_submodule(name)) is not None
    except AttributeError:
        return False


register_format(Format("lowbit", write=save_native, can_read=is_native, read=load_native,
                       description="lowbit native: safetensors + lowbit.json, any scheme", options=NativeOptions))
