"""The dtype of the float tensors outside quantized layers (token embedding, untied head, learned positions).

Why: those tensors are most of a 4-bit file (Llama-3.2-1B's 128256 x 2048 embedding is 1.05 GB as float32, 525 MB
as the bfloat16 it was published in) and the head is read once per generated token. lowbit computes in float32,
so a model is loaded as float32; `source_float_dtype` remembers the dtype its checkpoint stored (config.json's
"dtype" / "torch_dtype"), lowbit's writer stores embeddings and heads in it again where that is exact (they came
from that dtype: the values round-trip), and loading keeps them so, reading them at their own width:
`compute_in_float32` makes the modules holding them widen rows (an embedding) or multiply in float32 (a head, on
the compiled kernels' LB_F16 / LB_BF16 kinds), so every number computed is the one float32 weights give.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPE_CHOICES = ("source", *FLOAT_DTYPES)


def check_float_dtype(name: Any) -> str:
    """`name` if it is a float_dtype lowbit's writer accepts, else a one-line LowbitError."""
    if name not in FLOAT_DTYPE_CHOICES:
        raise LowbitError(f"float_dtype {name!r} unknown; use one of {', '.join(FLOAT_DTYPE_CHOICES)} (source: the "
                          "dtype of the checkpoint the model was loaded from)")
    return name


def source_float_dtype(folder: Path) -> torch.dtype | None:
    """The float dtype config.json says the folder's weights are stored in, or None when it names none."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    name = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    return FLOAT_DTYPES.get(name) if isinstance(name, str) else None


def embedding_and_head_weights(model: nn.Module) -> dict[int, nn.Module]:
    """{data pointer: module} of the 2-D weights of nn.Embedding and float nn.Linear modules (the embedding, an
    untied head, learned positions); other float tensors (norms, biases) are small and stay float32."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        weight = float_module_weight(module)
        if weight is not None and weight.is_floating_point() and weight.dim() == 2:
            found[weight.data_ptr()] = module
    return found


def float_module_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight tensor of an nn.Embedding or nn.Linear (subclasses included), else None. Other modules are not
    asked for a `weight`: a QuantLinear answers it by dequantizing its whole weight (seconds and a float32 copy per
    layer, 9 s of a 1B model's load)."""
    if not isinstance(module, (nn.Embedding, nn.Linear)):
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def embedding_and_head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the weights `embedding_and_head_weights` finds (for loaders, before weights exist)."""
    return {f"{name}.weight" for name, module in model.named_modules() if float_module_weight(module) is not None}


def kept_half_dtype(model: nn.Module) -> torch.dtype | None:
    """The float16 / bfloat16 dtype a loaded checkpoint kept its embedding or head in (re-saving keeps it)."""
    return next((p.dtype for p in model.parameters() if p.dtype in HALF_DTYPES), None)


def stored_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], float_dtype: str
                         ) -> dict[str, torch.Tensor]:
    """`tensors` (state-dict tensors outside quantized layers) with embedding and head weights in the dtype to
    store: `float_dtype` "source" stores them in the model's source dtype (model.lowbit_source_dtype) when the
    values survive it unchanged, else as they are; a named dtype converts them (rounding, if narrower)."""
    check_float_dtype(float_dtype)
    target = getattr(model, "lowbit_source_dtype", None) if float_dtype == "source" else FLOAT_DTYPES[float_dtype]
    if target is None:
        return tensors
    pointers = embedding_and_head_weights(model)
    stored = dict(tensors)
    for key, value in tensors.items():
        if value.data_ptr() not in pointers or value.dtype == target:
            continue
        converted = value.to(target)
        if float_dtype == "source" and not torch.equal(converted.to(value.dtype), value):
            continue           # changed since it was loaded (e.g. trained): keep it exact
        stored[key] = converted.contiguous()
    return stored


def _float32_rows(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


class HalfWeightLinear(nn.Linear):
    """An nn.Linear whose weight stays float16 / bfloat16 and whose output is float32 x W^T of those values (the
    compiled kernel reads the half weight as stored; without it, torch multiplies a float32 copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.runtime.clib import linear, linear_spec, native_library

        from lowbit.runtime.fast_kernels import PREFILL_ROWS, PREFILL_SLICE_ROWS

        rows = x.reshape(-1, x.shape[-1]).float()
        if native_library() is not None and rows.shape[0] < PREFILL_ROWS:
            spec, keep = linear_spec(self)
            out = linear(spec, rows)
        else:
            # many rows (eval's logits at every position): float32 GEMMs over slices of the weight widened to
            # float32, so the transient copy stays one slice (a 150k-row head is never widened whole)
            out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
            for n0 in range(0, self.out_features, PREFILL_SLICE_ROWS):
                n1 = min(self.out_features, n0 + PREFILL_SLICE_ROWS)
                bias = None if self.bias is None else self.bias[n0:n1].float()
                out[:, n0:n1] = nn.functional.linear(rows, self.weight[n0:n1].float(), bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def compute_in_float32(model: nn.Module) -> None:
    """Make the modules whose weights are float16 / bfloat16 compute float32 from them, in place: embeddings give
    float32 rows, Linears become HalfWeightLinear (the weights themselves, tied or not, are not copied)."""
    for module in model.modules():      # a tied head holds the embedding's Parameter: it is found here too
        weight = float_module_weight(module)
        if weight is None or weight.dtype not in HALF_DTYPES:
            continue
        if isinstance(module, nn.Embedding) and not getattr(module, "lowbit_float32_rows", False):
            module.register_forward_hook(_float32_rows)
            module.lowbit_float32_rows = True
        elif type(module) is nn.Linear:
            module.__class__ = HalfWeightLinear


def keep_half_weights(model: nn.Module) -> None:
    """What every reader does once a checkpoint's tensors are in `model`: half embeddings and heads compute in
    float32 from their stored width, and the model remembers that width so re-saving keeps it."""
    compute_in_float32(model)
    model.lowbit_source_dtype = kept_half_dtype(model)
