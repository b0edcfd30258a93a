"""Model surgery: find the Linear layers to quantize and swap them for QuantLinear modules."""
from __future__ import annotations

import fnmatch
import re
from typing import Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.adapters import is_linear
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True if a module name matches a skip pattern: a glob, a regex (prefix 're:'), or dotted name parts
    (`lm_head`, `mlp.down_proj`, `layers.0`)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatch(name, pattern) or f".{pattern}." in f".{name}.":
            return True
        elif any(ch in pattern for ch in "*?[") and fnmatch.fnmatch(name.rsplit(".", 1)[-1], pattern):
            return True
    return False


def iter_linears(module: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) for every Linear-like module under `module` not matched by `skip`."""
    for name, child in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_linear(child) and not matches_any(full, skip):
            yield full, child


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, new)


def install_quantized(root: nn.Module, name: str, qweight: QuantizedWeight, kernel: str = "auto",
                      source: object = None, output_order: torch.Tensor | None = None) -> QuantLinear:
    """Replace the Linear `name` under `root` by a QuantLinear holding `qweight` (bias kept); an embedding
    table becomes a QuantEmbedding (its scale, e.g. Gemma's sqrt(hidden), kept). The weight is checked against
    the layer first (shape, codes, statistics: lowbit.models.validate), so a checkpoint's misshapen layer is an
    error naming it (`source`, the file), not memory a kernel reads past. `output_order`: the layer's outputs
    are the stored rows' in this order (QuantLinear's output_order; rows kept as stored, e.g. a view of a GGUF
    file's q / k blocks in llama.cpp's order); not for embeddings."""
    from lowbit.models.validate import check_quantized_weight, module_weight_shape
    from lowbit.runtime.qembedding import QuantEmbedding

    old = root.get_submodule(name)
    check_quantized_weight(name, qweight, module_weight_shape(old), source)
    embedding = isinstance(old, (nn.Embedding, QuantEmbedding)) or type(old).__name__.endswith("ScaledWordEmbedding")
    if embedding and output_order is not None:
        raise LowbitError(f"{name}: an embedding table's rows are looked up by token id; they take no output order")
    if embedding:
        new: QuantLinear = QuantEmbedding(qweight, getattr(old, "embed_scale", getattr(old, "scale", None)),
                                          getattr(old, "padding_idx", None), kernel=kernel)
    else:
        from lowbit.runtime.clib import keep_kernel_layout

        new = QuantLinear(qweight, getattr(old, "bias", None), kernel=kernel, output_order=output_order)
        keep_kernel_layout(qweight)    # codes held once, in the bytes the kernels read (an embedding looks up rows)
    untie_if_shared(root, old)
    replace_module(root, name, new)
    return new


def untie_if_shared(root: nn.Module, module: nn.Module) -> None:
    """A quantized output projection no longer shares the embedding's weight: say so in the config, or
    transformers' tie_weights() (on load, on save) would try to put the embedding back into it. Whether the
    head's weight is still the embedding's tensor (quantizing) or not yet (loading into an empty model), the
    config is what transformers follows."""
    config = getattr(root, "config", None)
    output = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    if config is not None and getattr(config, "tie_word_embeddings", False) and module is output:
        config.tie_word_embeddings = False


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the matmul kernel of every QuantLinear in `model`."""
    for _, module in quantized_modules(model):
        module.set_kernel(kernel)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every QuantLinear replaced by an nn.Linear holding its dequantized weight
    (what transformers would run for the same numbers: the reference for engine and kernel checks)."""
    import copy

    from lowbit.runtime.qembedding import QuantEmbedding

    plain = copy.deepcopy(model)
    for name, module in list(quantized_modules(plain)):
        if isinstance(module, QuantEmbedding):
            replace_module(plain, name, module.dequantized())
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight.data = module.weight        # in output order
        if module.bias is not None:
            linear.bias.data = module.bias.data.clone()
        replace_module(plain, name, linear)
    return plain
