"""compressed-tensors checkpoints: llm-compressor's format, which transformers and vLLM load.

The packing, the quantization arithmetic and the config schema are the `compressed-tensors` package's own (its
compressors and pydantic config classes), so a file written here is what llm-compressor would write for the same
codes, and a file read here dequantizes as compressed-tensors dequantizes it.

Per quantized Linear with prefix P (N outputs, K inputs, b bits), the codes are signed, q_s = q - 2^(b-1):
- "pack-quantized" (W4A16, W8A16, ...): P.weight_packed int32 [N, K*b/32] (codes packed along K),
  P.weight_scale [N, G], P.weight_shape int64 [2], and for asymmetric grids P.weight_zero_point int32
  [N*b/32, G] (signed zero points packed along N). W[n, k] = scale[n, g] * (q_s[n, k] - zp_s[n, g]).
- "int-quantized" (W8A8): P.weight int8 [N, K], P.weight_scale [N, 1]; activations are quantized per token at
  run time (config_groups.*.input_activations, dynamic).
lowbit's unsigned grid q in [0, 2^b - 1] with zero z maps to q_s = q - 2^(b-1), zp_s = z - 2^(b-1); a symmetric
lowbit grid has z = 2^(b-1), i.e. zp_s = 0, which is compressed-tensors' symmetric form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError
from lowbit.formats.hf_quantized import load_checkpoint, read_quantization_config, write_checkpoint
from lowbit.formats.registry import Format, register_format
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.surgery import iter_linears, quantized_modules
from lowbit.schemes.intgrid import IntGrid
from lowbit.schemes.int8row import RowInt8

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INSTALL_HINT = "pip install 'lowbit[compressed-tensors]' (compressed-tensors==0.20.0)"


@dataclass(frozen=True)
class CompressedTensorsOptions:
    """dtype: floating dtype of the scales and of the unquantized tensors (float16, bfloat16, float32); None keeps
    the model's (vLLM runs float16/bfloat16 checkpoints; a float32 one needs vLLM's --dtype)."""

    dtype: str | None = None


def _ct():
    """The compressed_tensors package, or a one-line error saying how to install it."""
    try:
        import compressed_tensors
    except ImportError:
        raise LowbitError(f"the compressed-tensors format needs the compressed-tensors package: {INSTALL_HINT}") \
            from None
    return compressed_tensors


# -- one layer's scheme ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerScheme:
    """What compressed-tensors calls a layer's scheme, in the few fields lowbit's grids map to."""

    format: str                  # pack-quantized or int-quantized
    bits: int
    strategy: str                # group or channel
    group_size: int | None
    symmetric: bool
    activations: str | None = None     # None (weight-only), "symmetric" or "asymmetric" dynamic per-token int8

    def to_ct(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy=self.strategy,
                                   group_size=self.group_size, dynamic=False)
        inputs = None
        if self.activations is not None:
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=self.activations == "symmetric",
                                      strategy="token", dynamic=True)
        return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs, format=self.format)


def layer_scheme(name: str, qw: QuantizedWeight) -> LayerScheme:
    """The compressed-tensors scheme holding this layer exactly, or a one-line error saying why none does."""
    scheme = qw.scheme
    n, k = qw.shape
    if isinstance(scheme, RowInt8):
        if scheme.activations == "float":
            return LayerScheme(PACK_QUANTIZED, 8, "channel", None, True)
        if scheme.activations == "int8" and scheme.threshold > 0:
            raise LowbitError(f"layer {name} is LLM.int8 with outlier threshold {scheme.threshold:g}, whose float "
                              "outlier columns compressed-tensors cannot express; quantize with --method "
                              "dynamic-int8 (W8A8) or --threshold 0, or save as bnb")
        return LayerScheme(INT_QUANTIZED, 8, "channel", None, True,
                           activations="asymmetric" if scheme.activations == "int8-asym" else "symmetric")
    if not isinstance(scheme, IntGrid) or qw.zeros is None:
        raise LowbitError(f"layer {name} uses scheme {scheme.name}, which compressed-tensors cannot store: it has "
                          "integer grids (W4A16, W8A16, W8A8) and FP4/FP8 floats, but no NF4/FP4 codebook; "
                          "quantize with --method rtn, gptq, awq or dynamic-int8, or save NF4 as bnb")
    if qw.g_idx is not None and not torch.equal(qw.g_idx.long(), torch.arange(k) // qw.effective_group_size):
        raise LowbitError(f"layer {name} uses act-order with reordered groups (g_idx); lowbit writes "
                          "compressed-tensors without g_idx: quantize with --static-groups, or save as gptq")
    group = qw.effective_group_size
    if group < k and k % group:
        raise LowbitError(f"layer {name}: group size {group} does not divide its input width {k}, which "
                          "compressed-tensors requires; choose a dividing group size (e.g. 64 or 32) or skip the layer")
    symmetric = scheme.symmetric and bool((qw.zeros == 2 ** (scheme.bits - 1)).all())
    return LayerScheme(PACK_QUANTIZED, scheme.bits, "group" if group < k else "channel", group if group < k else None,
                       symmetric)


def _scales_in(name: str, scales: torch.Tensor, dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """Scales in the file's dtype. Integer grids keep fp16-exact scales, so a rounding there is an error; int8 rows
    (absmax / 127 in float32) are rounded as llm-compressor stores them in the model's dtype: each weight moves by
    at most half an ulp of the dtype (2^-11 relative in float16), and the codes stay."""
    cast = scales.to(dtype)
    if exact and not torch.equal(cast.float(), scales.float()):
        raise LowbitError(f"layer {name}: its scales are not exactly representable in {str(dtype)[6:]}; write "
                          "with dtype float32 (or float16: lowbit's grids keep fp16-exact scales), or save as lowbit")
    return cast


def layer_tensors(name: str, qw: QuantizedWeight, scheme: LayerScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's tensors, made by compressed-tensors' own compressor from lowbit's codes (checked exact)."""
    from compressed_tensors.compressors import BaseCompressor

    offset = 2 ** (scheme.bits - 1)
    scales = qw.scales.float()
    zeros = qw.zeros.float()
    if scheme.strategy == "channel":      # per-tensor lowbit grids hold one repeated column
        scales, zeros = scales[:, :1], zeros[:, :1]
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": scales}
    if not scheme.symmetric:
        state["weight_zero_point"] = (zeros.round() - offset).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = dict(compressor.compress(state, scheme.to_ct(["Linear"])))
    # The compressor re-derives codes as round(W / scale) + zero; W = scale * (q - zero) makes that exact, and
    # this check keeps it so (a wrong code would silently change the model).
    if not torch.equal(_signed_codes(out, scheme, qw.shape).to(torch.int16), qw.codes.to(torch.int16) - offset):
        raise LowbitError(f"layer {name}: compressed-tensors did not reproduce its codes exactly; save as lowbit")
    out["weight_scale"] = _scales_in(name, scales, dtype, exact=isinstance(qw.scheme, IntGrid))
    return out


def _signed_codes(tensors: dict[str, torch.Tensor], scheme: LayerScheme, shape) -> torch.Tensor:
    if scheme.format == INT_QUANTIZED:
        return tensors["weight"]
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(tensors["weight_packed"], scheme.bits, torch.Size(shape))


# -- whole checkpoints -----------------------------------------------------------------------------------------
def quantization_config(model: nn.Module, schemes: dict[str, LayerScheme]) -> dict[str, Any]:
    """config.json's quantization_config, built with compressed-tensors' own QuantizationConfig."""
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[LayerScheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    ignore = sorted({name for name, _ in iter_linears(model)})     # Linears kept in float
    if len(groups) == 1:
        (scheme, _), = groups.items()
        config_groups = {"group_0": scheme.to_ct(["Linear"])}
    else:   # mixed grids: each group names its layers exactly
        config_groups = {f"group_{i}": scheme.to_ct([f"re:^{re.escape(n)}$" for n in names])
                         for i, (scheme, names) in enumerate(groups.items())}
    formats = {scheme.format for scheme in groups}
    config = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1
                                else "mixed-precision", quantization_status="compressed", ignore=ignore)
    data = config.model_dump(mode="json")
    data.update({"quant_method": QUANT_METHOD, "version": ct.__version__, "sparsity_config": {}})
    return data


def save_compressed_tensors(model: nn.Module, tokenizer: Any, out: str | Path,
                            options: CompressedTensorsOptions | None = None) -> Path:
    """Write a quantized model as a compressed-tensors checkpoint folder, atomically."""
    options = options or CompressedTensorsOptions()
    if options.dtype is not None and options.dtype not in FLOAT_DTYPES:
        raise LowbitError(f"compressed-tensors dtype {options.dtype!r} unknown; use one of {', '.join(FLOAT_DTYPES)}")
    _ct()
    quantized = dict(quantized_modules(model))
    schemes = {name: layer_scheme(name, module.qweight) for name, module in quantized.items()}
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype = FLOAT_DTYPES[options.dtype] if options.dtype else model_dtype
    return write_checkpoint(model, tokenizer, out, "compressed-tensors",
                            lambda name, qw: layer_tensors(name, qw, schemes[name], dtype),
                            quantization_config(model, schemes), float_dtype=dtype)


def is_compressed_tensors(path: Path) -> bool:
    qc = read_quantization_config(Path(path))
    return qc is not None and str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def _scheme_for(name: str, groups: dict[str, Any]) -> Any:
    """The config group whose targets name this Linear ("Linear", its exact name, or an "re:" pattern)."""
    for group in groups.values():
        for target in group.targets:
            if target == "Linear" or target == name or (target.startswith("re:") and re.match(target[3:], name)):
                return group
    raise CorruptFile(f"compressed-tensors layer {name} holds quantized tensors but no config group targets it")


def layer_from_compressed(name: str, parts: dict[str, torch.Tensor], group: Any, fmt: str,
                          shape: tuple[int, int]) -> QuantizedWeight:
    """Rebuild a QuantizedWeight of `shape` from one layer's compressed-tensors tensors (codes unpacked by
    compressed-tensors' own helpers), so it dequantizes exactly as compressed-tensors does."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    args = group.weights
    fmt = group.format or fmt
    if args is None or args.type != "int" or args.strategy not in ("group", "channel", "tensor"):
        raise LowbitError(f"compressed-tensors layer {name}: weights {args} are not an integer group/channel grid; "
                          "lowbit reads pack-quantized and int-quantized integer checkpoints")
    bits, n, k = args.num_bits, shape[0], shape[1]
    offset = 2 ** (bits - 1)
    if "weight_scale" not in parts:
        raise CorruptFile(f"compressed-tensors layer {name} lacks weight_scale; the checkpoint is incomplete")
    scales = parts["weight_scale"].float().reshape(n, -1) if parts["weight_scale"].numel() > 1 \
        else parts["weight_scale"].float().reshape(1, 1).expand(n, 1).contiguous()
    if fmt == PACK_QUANTIZED:
        if "weight_packed" not in parts:
            raise CorruptFile(f"compressed-tensors layer {name} lacks weight_packed; the checkpoint is incomplete")
        stored = tuple(int(d) for d in parts.get("weight_shape", torch.tensor(shape)).tolist())
        if stored != tuple(shape):
            raise CorruptFile(f"compressed-tensors layer {name}: weight_shape {list(stored)} is not the model's "
                              f"Linear {list(shape)}")
        signed = unpack_from_int32(parts["weight_packed"], bits, torch.Size(shape))
    elif fmt in (INT_QUANTIZED, "naive-quantized"):
        signed = parts.get("weight")
        if signed is None or signed.dtype != torch.int8:
            raise CorruptFile(f"compressed-tensors layer {name}: int-quantized weight must be int8")
    else:
        raise LowbitError(f"compressed-tensors layer {name} is stored as {fmt!r}; lowbit reads {PACK_QUANTIZED} and "
                          f"{INT_QUANTIZED} checkpoints")
    if args.symmetric:
        zeros = torch.full_like(scales, float(offset))
    else:
        zp = parts.get("weight_zero_point")
        if zp is None:
            raise CorruptFile(f"compressed-tensors layer {name}: asymmetric but no weight_zero_point")
        if fmt == PACK_QUANTIZED:
            zp = unpack_from_int32(zp, bits, torch.Size((n, scales.shape[1])), packed_dim=0)
        zeros = zp.float().reshape(n, -1) + offset
    group_size = args.group_size if args.strategy == "group" else -1
    if args.strategy == "group" and scales.shape[1] * group_size != k:
        raise CorruptFile(f"compressed-tensors layer {name}: {scales.shape[1]} scale groups of {group_size} do not "
                          f"cover {k} inputs")
    scheme = IntGrid(bits=bits, group_size=group_size, symmetric=bool(args.symmetric))
    codes = (signed.to(torch.int16) + offset).to(torch.uint8)
    return QuantizedWeight(scheme, (n, k), codes=codes.contiguous(), scales=scales.contiguous(),
                           zeros=zeros.contiguous(), group_size=group_size)


def load_compressed_tensors(path: str | Path, kernel: str = "auto", **_: Any):
    """(model, tokenizer) from a compressed-tensors folder, quantized layers kept as their integer codes."""
    _ct()
    from compressed_tensors.quantization import QuantizationConfig

    path = Path(path)
    qc = dict(read_quantization_config(path) or {})
    try:
        config = QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                    if k in QuantizationConfig.model_fields})
    except ValueError as exc:
        raise CorruptFile(f"{path}: its compressed-tensors quantization_config is invalid ({exc})") from None
    status = str(config.quantization_status.value if hasattr(config.quantization_status, "value")
                 else config.quantization_status)
    if status != "compressed":
        raise LowbitError(f"{path}: compressed-tensors status {status!r} holds float weights; load it with "
                          "transformers, or save it compressed")
    weight_groups = [g.weights for g in (config.config_groups or {}).values() if g.weights is not None]
    if not weight_groups:
        raise CorruptFile(f"{path}: its compressed-tensors quantization_config has no weight quantization group; "
                          "lowbit reads weight-quantized checkpoints (W4A16, W8A16, W8A8)")
    model, tokenizer = load_checkpoint(
        path, "compressed-tensors", "weight_scale",
        lambda name, parts, shape: layer_from_compressed(name, parts, _scheme_for(name, config.config_groups),
                                                         config.format, shape),
        kernel=kernel)
    from lowbit.methods.base import QuantizeConfig

    first = weight_groups[0]
    model.lowbit_config = QuantizeConfig(method=QUANT_METHOD, bits=first.num_bits,
                                         group_size=first.group_size or -1, symmetric=bool(first.symmetric))
    return model, tokenizer


register_format(Format(QUANT_METHOD, write=save_compressed_tensors, can_read=is_compressed_tensors,
                       read=load_compressed_tensors, options=CompressedTensorsOptions,
                       description="compressed-tensors (llm-compressor / transformers / vLLM): W4A16, W8A16, W8A8"))
