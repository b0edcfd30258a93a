"""What the GPTQ and AWQ checkpoint formats share: an HF folder whose config.json carries a
`quantization_config`, one safetensors file holding each quantized Linear as packed int32 words plus fp16
scales, and every other tensor (embeddings, norms, unquantized Linears) as it is.

Each format supplies how one QuantizedWeight becomes tensors (and back); this module walks the model,
writes atomically, and rebuilds a runnable model on load.
"""
from __future__ import annotations

import bisect

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import CorruptFile, LowbitError, unreadable_weights
from lowbit.formats.atomic import atomic_dir
from lowbit.models.float_dtype import HALF_DTYPES, embedding_and_head_keys, keep_half_weights, stored_float_tensors
from lowbit.models.validate import check_state, check_state_tensor, layer_errors
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.surgery import install_quantized, iter_linears, quantized_modules

WEIGHTS = "model.safetensors"


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """config.json's quantization_config of an HF folder, or None (also for non-folders and bad JSON)."""
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir() or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("quantization_config") if isinstance(data, dict) else None


def check_fp16_exact(name: str, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Scales as fp16, or a clear error when rounding them to fp16 would change the weights."""
    half = scales.half()
    if not torch.equal(half.float(), scales.float()):
        raise LowbitError(f"layer {name}: its scales are not exactly representable in fp16, which the {fmt} "
                          "format stores; quantize with an fp16 scale grid (lowbit's default) or save as lowbit")
    return half


def skipped_suffixes(model: nn.Module, blocks_path: str) -> list[str]:
    """Block-relative names (e.g. 'mlp.down_proj') of Linears kept in float inside decoder blocks, plus others."""
    names = []
    for name, _ in iter_linears(model):   # QuantLinear is not Linear-like: these are the float ones
        if name.startswith(blocks_path + "."):
            rest = name[len(blocks_path) + 1:].split(".", 1)
            name = rest[1] if len(rest) == 2 else name
        if name not in names:
            names.append(name)
    return names


def write_checkpoint(model: nn.Module, tokenizer: Any, out: str | Path, fmt: str,
                     layer_tensors: Callable[[str, QuantizedWeight], dict[str, torch.Tensor]],
                     quant_config: dict[str, Any], extra_files: dict[str, dict[str, Any]] | None = None,
                     float_dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF folder: quantized layers via `layer_tensors`, config with `quant_config`;
    `float_dtype` casts the floating tensors outside the quantized layers (and the config's dtype) to it."""
    from lowbit.formats.native import unquantized_tensors, save_hf_side_files

    out = Path(out)
    quantized = dict(quantized_modules(model))
    if not quantized:
        raise LowbitError(f"the model has no quantized layers: quantize it before saving as {fmt}")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.items():
        for key, value in layer_tensors(name, module.qweight).items():
            tensors[f"{name}.{key}"] = value.contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    floats = unquantized_tensors(model, quantized)[0]
    if float_dtype is None:      # embedding and head in the source checkpoint's dtype where exact
        floats = stored_float_tensors(model, floats, "source")
    else:
        floats = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in floats.items()}
        tensors = {k: v.to(float_dtype) if k.endswith(".bias") else v for k, v in tensors.items()}
    tensors.update(floats)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_hf_side_files(model, tokenizer, tmp)
        cfg_path = tmp / "config.json"
        config = json.loads(cfg_path.read_text())
        config["quantization_config"] = quant_config
        if float_dtype is not None:
            # transformers 5 reads "dtype", older releases "torch_dtype"; loaders pick the model's dtype from it
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = str(float_dtype).replace("torch.", "")
        cfg_path.write_text(json.dumps(config, indent=2))
        for filename, content in (extra_files or {}).items():
            (tmp / filename).write_text(json.dumps(content, indent=2))
    return out


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding a folder's weights, as transformers picks them: the shards its
    model.safetensors.index.json lists, else model.safetensors, else every *.safetensors file. Other files
    (Mistral's consolidated.safetensors next to the HF shards, adapters) are not weights of this model."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CorruptFile(f"{index} is not a valid shard index ({exc})") from exc
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CorruptFile(f"{folder}: shards {missing[:3]} listed in {index.name} are missing; the checkpoint "
                              "is incomplete")
        return [folder / name for name in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files (`weight_files`), memory-mapped, with a clear error when one is
    damaged (`read_checkpoint` with nothing to convert)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path, converted: Callable[[list[str]], set[str]] | None = None
                    ) -> tuple[dict[str, torch.Tensor], "LayerReader"]:
    """The tensors of the folder's weight files (`weight_files`), with a clear error when one is damaged, as
    (tensors, layers): `tensors` are memory-mapped views of the files (kept as they are, they cost the file's pages,
    shared); those `converted(keys)` names are left to `layers`, which reads them a layer at a time: a loader
    turns them into another layout (packed codes for the kernels), so they are read into memory of their own,
    freed after the conversion, instead of leaving the file's pages they touched resident for as long as any
    tensor of the file is alive."""
    files = weight_files(path)
    if not files:
        raise CorruptFile(f"{path} has no *.safetensors file; the checkpoint is incomplete")
    tensors: dict[str, torch.Tensor] = {}
    deferred: dict[str, tuple[Any, Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as mapped:
                keys = list(mapped.keys())
                copies = converted(keys) if converted is not None else set()
                read = safe_open(str(file), framework="pt", backend="pread") if copies else None
                for key in keys:
                    if key in copies:
                        deferred[key] = (read, file)
                    else:
                        tensors[key] = mapped.get_tensor(key)
        except (SafetensorError, OSError, MemoryError, RuntimeError) as exc:
            raise unreadable_weights(file, exc) from exc
    return tensors, LayerReader(deferred)


class LayerReader:
    """The tensors of a checkpoint's converted layers, read when a loader takes them, one layer at a time: each
    layer is converted to the kernels' layout and its file bytes freed before the next is read, so loading never
    holds every layer twice (a 1B model's load peaked 460 MB higher reading them all first)."""

    # Read bytes between two heap trims: a trim costs a pass over the heap, and an MoE checkpoint has thousands of
    # small expert layers, while what one 4-bit layer frees at 1B scale is tens of MB.
    TRIM_EVERY_BYTES = 64 << 20

    def __init__(self, deferred: dict[str, tuple[Any, Path]]):
        self._deferred = deferred     # key -> (its file's pread handle, the file)
        self._sorted = sorted(deferred)   # the keys a prefix starts are one run of these: no scan of all per layer
        self._read_since_trim = 0

    def keys(self) -> list[str]:
        """The names of the tensors not taken yet."""
        return list(self._deferred)

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with `prefix`, named without it, read now (and no longer held here).

        What converting the previous layers freed (their file bytes, their one-byte codes) is handed back to the OS
        once TRIM_EVERY_BYTES have been read since the last time: glibc kept it resident otherwise, 300 MB of a 1B
        model's load by its last layer."""
        from lowbit.runtime.memory import release_freed_heap

        if self._read_since_trim >= self.TRIM_EVERY_BYTES:
            release_freed_heap()
            self._read_since_trim = 0
        keys = []
        for index in range(bisect.bisect_left(self._sorted, prefix), len(self._sorted)):
            if not self._sorted[index].startswith(prefix):
                break
            keys.append(self._sorted[index])
        parts = {}
        for key in [k for k in keys if k in self._deferred]:
            handle, file = self._deferred.pop(key)
            try:
                parts[key[len(prefix):]] = tensor = handle.get_tensor(key)
            except (SafetensorError, OSError, MemoryError, RuntimeError) as exc:
                raise unreadable_weights(file, exc) from exc
            self._read_since_trim += tensor.numel() * tensor.element_size()
        return parts


def layer_tensors(prefixes: Iterable[str]) -> Callable[[list[str]], set[str]]:
    """For read_checkpoint: the keys of the layers named by `prefixes` (their parts, a bias included)."""
    starts = tuple(f"{p}." for p in prefixes)
    return lambda keys: {key for key in keys if key.startswith(starts)}


def layers_owning(suffix: str) -> Callable[[list[str]], set[str]]:
    """For read_checkpoint: the keys of every layer that has a tensor ending in `suffix` (e.g. '.qweight')."""
    return lambda keys: layer_tensors(key[: -len(suffix)] for key in keys if key.endswith(suffix))(keys)


def load_checkpoint(path: str | Path, fmt: str, marker: str,
                    build_layer: Callable[[str, dict[str, torch.Tensor], tuple[int, int]], QuantizedWeight],
                    kernel: str = "auto", dtype: torch.dtype = torch.float32):
    """Rebuild (model, tokenizer) from a folder whose quantized layers are the prefixes owning `marker`.

    `build_layer(prefix, parts, (out, in))` turns one layer's tensors (keys without the prefix) into a
    QuantizedWeight of the model's Linear shape (packed tensors may be padded, so they cannot tell it alone).
    Floating tensors of other layers are cast to `dtype` (checkpoints often hold fp16 while the skeleton is
    fp32), except a float16 / bfloat16 embedding or head: kept at its width and computed in float32
    (models/float_dtype.py), as the values the cast would give.
    """
    from lowbit.models.loading import empty_model_from_config, load_config, load_tokenizer

    path = Path(path)
    suffix = f".{marker}"
    tensors, deferred = read_checkpoint(path, layers_owning(suffix))
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is plain; lowbit installs its own quantized layers
    model = empty_model_from_config(config, dtype=dtype)
    layers = [k[: -len(suffix)] for k in deferred.keys() if k.endswith(suffix)]
    if not layers:
        raise CorruptFile(f"{path} says it is a {fmt} checkpoint but holds no '*{suffix}' tensors")
    for name in layers:
        parts = deferred.take(f"{name}.")
        bias = parts.pop("bias", None)
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise CorruptFile(f"{path}: quantized layer {name} does not exist in this {config.model_type} model") from exc
        if not isinstance(linear, nn.Linear):
            raise CorruptFile(f"{path}: {name} is not a Linear layer of this {config.model_type} model")
        shape = (linear.out_features, linear.in_features)
        with layer_errors(path, name):
            qweight = build_layer(name, parts, shape)
        module = install_quantized(model, name, qweight, kernel, source=path)
        if bias is not None:
            check_state_tensor(module, "bias", bias, path, name)
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    check_state(model, tensors, path, skip_prefixes=layers)
    # a float16 / bfloat16 embedding or head stays so (read at its width, computed in float32: float_dtype.py)
    halves = embedding_and_head_keys(model)
    tensors = {k: v.to(dtype) if v.is_floating_point() and not (k in halves and v.dtype in HALF_DTYPES) else v
               for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    keep_half_weights(model)
    model.eval()
    return model, load_tokenizer(path)


def check_format_config(format_name: str, config: Any) -> None:
    """Fail before any work when a QuantizeConfig cannot be written in `format_name` (AWQ is 4-bit only, ...)."""
    if format_name == "awq" and config.bits != 4:
        raise LowbitError(f"the AWQ format is 4-bit only, and --bits is {config.bits}: use --bits 4, or write "
                          f"{config.bits}-bit models with --format lowbit or --format gptq")
    if format_name == "gptq" and config.bits not in (2, 3, 4, 8):
        raise LowbitError(f"the GPTQ format stores 2, 3, 4 or 8 bits, and --bits is {config.bits}; "
                          "choose one of those or --format lowbit")
