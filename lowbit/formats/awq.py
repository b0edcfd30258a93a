"""AWQ GEMM checkpoints, as AutoAWQ writes them and transformers and vLLM load them (4-bit only).

Per quantized Linear with prefix P (K = in_features, N = out_features, g = group size):
- P.qweight int32 [K, N/8]: packed along N (unlike GPTQ); nibble i of word c holds output column
  8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (the interleave AWQ's GEMM kernel unpacks).
- P.qzeros int32 [K/g, N/8]: zero points as they are (no minus one), packed the same way.
- P.scales fp16 [K/g, N]; no g_idx (AWQ has no act-order); P.bias when present.
Dequantize: W[n, k] = scales[k // g, n] * (q[k, n] - zeros[k // g, n]).
config.json quantization_config: quant_method "awq", bits 4, group_size, zero_point, version "gemm",
modules_to_not_convert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError
from lowbit.formats.gptq import _as_int32
from lowbit.formats.hf_quantized import (check_fp16_exact, load_checkpoint, read_quantization_config,
                                         skipped_suffixes, write_checkpoint)
from lowbit.formats.registry import Format, NoOptions, register_format
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.surgery import quantized_modules
from lowbit.schemes.intgrid import IntGrid

AWQ_BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PER_WORD = 32 // AWQ_BITS


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit values [R, C] -> int32 [R, C/8] with AWQ's column interleave."""
    r, c = values.shape
    if c % _PER_WORD:
        raise LowbitError(f"AWQ packs 8 columns per word, and {c} is not a multiple of 8")
    v = values.to(torch.int64).reshape(r, c // _PER_WORD, _PER_WORD)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(_PER_WORD, dtype=torch.int64) * AWQ_BITS
    return _as_int32((v << shifts).sum(dim=-1))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [R, C/8] -> uint8 [R, C]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    r, w = words.shape
    shifts = torch.arange(_PER_WORD, dtype=torch.int64) * AWQ_BITS
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF             # nibble i holds column AWQ_ORDER[i]
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return out.reshape(r, w * _PER_WORD).to(torch.uint8)


def check_layer(name: str, qw: QuantizedWeight) -> IntGrid:
    """The layer's 4-bit grid, or a clear error saying why AWQ GEMM cannot store it."""
    scheme = qw.scheme
    if not isinstance(scheme, IntGrid) or qw.zeros is None:
        raise LowbitError(f"layer {name} uses scheme {scheme.name}, which the AWQ format cannot store; quantize "
                          "with --method awq, gptq or rtn on an integer grid, or save as lowbit")
    if scheme.bits != AWQ_BITS:
        raise LowbitError(f"the AWQ format is 4-bit only, and layer {name} has {scheme.bits}-bit codes; use "
                          f"--bits 4, or save {scheme.bits}-bit models as lowbit (--format lowbit) or gptq")
    n, k = qw.shape
    g = qw.effective_group_size
    if qw.g_idx is not None:
        raise LowbitError(f"layer {name} uses act-order (g_idx), which AWQ cannot store; use --format gptq")
    if k % g:
        raise LowbitError(f"layer {name}: group size {g} does not divide its input width {k}, which AWQ "
                          "requires; choose a dividing group size or skip the layer")
    if n % _PER_WORD:
        raise LowbitError(f"layer {name}: output width {n} is not a multiple of 8, which AWQ packing requires")
    return scheme


def awq_layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales of one layer in AWQ GEMM layout."""
    check_layer(name, qw)
    return {"qweight": pack_awq(qw.codes.t()),
            "qzeros": pack_awq(qw.zeros.round().t()),
            "scales": check_fp16_exact(name, qw.scales, "AWQ").t().contiguous()}


def layer_from_awq(name: str, parts: dict[str, torch.Tensor], group_size: int, zero_point: bool,
                   shape: tuple[int, int]) -> QuantizedWeight:
    """Rebuild a QuantizedWeight of `shape` (out, in) from one layer's AWQ GEMM tensors."""
    for key in ("qweight", "qzeros", "scales"):
        if key not in parts:
            raise CorruptFile(f"AWQ layer {name} lacks its {key} tensor; the checkpoint is incomplete")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * _PER_WORD
    if (n, k) != tuple(shape):
        raise CorruptFile(f"AWQ layer {name}: qweight {tuple(qweight.shape)} holds a [{n}, {k}] weight, and the "
                          f"model's Linear is {list(shape)}")
    g = k if group_size in (-1, 0) else group_size
    if k % g or scales.shape != (k // g, n) or qzeros.shape != (k // g, n // _PER_WORD):
        raise CorruptFile(f"AWQ layer {name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and "
                          f"scales {tuple(scales.shape)} do not fit group size {group_size}")
    scheme = IntGrid(bits=AWQ_BITS, group_size=g if g < k else -1, symmetric=not zero_point)
    return QuantizedWeight(scheme, (n, k), codes=unpack_awq(qweight).t().contiguous(),
                           scales=scales.float().t().contiguous(), zeros=unpack_awq(qzeros).float().t().contiguous(),
                           group_size=scheme.group_size)


def awq_quantization_config(model: nn.Module) -> dict[str, Any]:
    """config.json quantization_config for the model's quantized layers (one group size and zero-point mode)."""
    from lowbit.models.adapters import adapter_for

    grids = set()
    for name, module in quantized_modules(model):
        scheme = check_layer(name, module.qweight)
        grids.add((module.qweight.effective_group_size, scheme.symmetric))
    if len(grids) > 1:
        raise LowbitError(f"the AWQ format needs one group size and zero-point mode for all layers, and this model "
                          f"mixes {sorted(grids)}; quantize with one setting or save as lowbit")
    (group_size, symmetric), = grids
    skipped = skipped_suffixes(model, adapter_for(model).blocks_path)
    # Symmetric grids are stored with their zero point (2^(b-1)) in qzeros, which every GEMM loader reads.
    return {"quant_method": "awq", "bits": AWQ_BITS, "group_size": group_size, "zero_point": not symmetric,
            "version": "gemm", "modules_to_not_convert": skipped or None}


def save_awq(model: nn.Module, tokenizer: Any, out: str | Path, options: NoOptions | None = None) -> Path:
    """Write a quantized model as an AWQ GEMM checkpoint folder, atomically."""
    return write_checkpoint(model, tokenizer, out, "AWQ", awq_layer_tensors, awq_quantization_config(model))


def is_awq(path: Path) -> bool:
    qc = read_quantization_config(Path(path))
    return qc is not None and str(qc.get("quant_method", "")).lower() == "awq"


def load_awq(path: str | Path, kernel: str = "auto", **_: Any):
    """(model, tokenizer) from an AWQ GEMM checkpoint folder, quantized layers kept packed."""
    path = Path(path)
    qc = read_quantization_config(path) or {}
    bits = int(qc.get("bits", qc.get("w_bit", AWQ_BITS)))
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()   # transformers 5 writes "format"
    if bits != AWQ_BITS:
        raise CorruptFile(f"{path}: AWQ checkpoint with {bits} bits; AWQ GEMM is 4-bit")
    if version != "gemm":
        raise LowbitError(f"{path}: AWQ version {version!r} is not supported; lowbit reads AWQ 'gemm' checkpoints")
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    zero_point = bool(qc.get("zero_point", True))
    model, tokenizer = load_checkpoint(path, "AWQ", "qweight",
                                       lambda name, parts, shape: layer_from_awq(name, parts, group_size, zero_point, shape),
                                       kernel=kernel)
    from lowbit.methods.base import QuantizeConfig

    model.lowbit_config = QuantizeConfig(method="awq", bits=bits, group_size=group_size, symmetric=not zero_point,
                                         options={"zero_point": zero_point})
    return model, tokenizer


register_format(Format("awq", write=save_awq, can_read=is_awq, read=load_awq,
                       description="AWQ GEMM checkpoint (AutoAWQ / transformers / vLLM), 4-bit"))
