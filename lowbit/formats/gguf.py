"""GGUF (llama.cpp's file format): a validating reader, an atomic writer, full-model export and quantized loading.

Layout (GGUF v3): "GGUF", version, tensor count, key-value count; typed key-values; tensor infos (name, dims
innermost first, ggml type, offset into the data section); the data section aligned to general.alignment.

- `read_gguf(path)` parses and validates a file (CorruptFile with the reason for truncation, bad magic,
  unsupported versions, duplicate keys or tensors, misaligned or out-of-bounds data, unknown types); tensor
  data are zero-copy views of a memory map.
- `write_gguf(path, metadata, tensors)` writes one atomically (temp file + rename).
- `export_gguf(model, tokenizer, path, type=...)` turns an HF Llama/Qwen2 model into a complete file that
  llama.cpp runs: hyper-parameters, tokenizer, llama.cpp's per-tensor type rules (gguf_mixes).
- `load_gguf_quantized(path)` builds lowbit's runtime model from a GGUF file, keeping block types quantized.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError, UnsupportedArchitecture
from lowbit.formats.atomic import atomic_file
from lowbit.formats.gguf_file import (  # noqa: F401  (the one parser; GGUFFile, GGUFTensor re-exported)
    ARRAY, BOOL, DEFAULT_ALIGNMENT, FLOAT32, GGUFFile, GGUFTensor, INT32, INT64, MAGIC, QUANTIZED_TYPE_NAMES,
    STRING, TENSOR_TYPES, TYPE_NAMES, UINT32, WRITE_VERSION, _ARRAY_DTYPES, _SCALAR_FORMATS, read_gguf)
from lowbit.formats.gguf_mixes import TypePlanner, get_mix
from lowbit.formats.registry import Format, register_format
from lowbit.models.rope_scaling import ORIGINAL_CONTEXT_KEY, ROPE_FREQS, is_llama3_scaled, rope_divisors
from lowbit.schemes.ggml import CODECS, GGMLScheme, quantize_rows

log = logging.getLogger("lowbit")

# token types of tokenizer.ggml.token_type
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# -- writing ---------------------------------------------------------------------------------------------
@dataclass
class TensorToWrite:
    """A tensor for write_gguf: `data` holds values (float types) or block bytes [rows, row_bytes]."""

    name: str
    type_name: str
    shape: tuple[int, ...]  # PyTorch order
    data: np.ndarray

    def raw(self) -> bytes:
        if self.type_name == "F32":
            arr = np.asarray(self.data, dtype="<f4")
        elif self.type_name == "F16":
            arr = np.asarray(self.data, dtype="<f2")
        elif self.type_name == "BF16":
            arr = torch.from_numpy(np.ascontiguousarray(self.data, dtype=np.float32)).to(torch.bfloat16)
            arr = arr.view(torch.int16).numpy()
        else:
            arr = np.asarray(self.data, dtype=np.uint8)
        raw = np.ascontiguousarray(arr).tobytes()
        _, block, type_size = TENSOR_TYPES[self.type_name]
        n = int(np.prod(self.shape, dtype=np.int64))
        if len(raw) != n // block * type_size or self.shape[-1] % block:
            raise LowbitError(f"tensor {self.name}: {len(raw)} bytes do not make a {self.type_name} tensor of "
                              f"shape {list(self.shape)}")
        return raw


def _infer_value_type(value: Any) -> tuple[int, int | None]:
    if isinstance(value, bool):
        return BOOL, None
    if isinstance(value, int):
        return (UINT32, None) if 0 <= value < 2 ** 32 else (INT64, None)
    if isinstance(value, float):
        return FLOAT32, None
    if isinstance(value, str):
        return STRING, None
    if isinstance(value, (list, tuple)):
        # arrays of ints are INT32 (what llama.cpp expects for tokenizer.ggml.token_type), as gguf-py writes them
        if not value or (isinstance(value[0], int) and not isinstance(value[0], bool)):
            return ARRAY, INT32
        return ARRAY, _infer_value_type(value[0])[0]
    raise LowbitError(f"cannot store {type(value).__name__} values in GGUF metadata")


def _pack_value(vtype: int, value: Any, sub: int | None) -> bytes:
    if vtype == STRING:
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == ARRAY:
        head = struct.pack("<IQ", sub, len(value))
        if sub == STRING:
            return head + b"".join(_pack_value(STRING, v, None) for v in value)
        return head + np.asarray(value, dtype=_ARRAY_DTYPES[sub]).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], value)


# keys whose type an empty value cannot tell: a tokenizer without merges (a byte-level vocabulary) still needs a
# string array there, or llama.cpp refuses the file ("invalid gguf type for tokenizer.ggml.merges")
STRING_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any], tensors: Iterable[TensorToWrite],
               value_types: dict[str, tuple[int, int | None]] | None = None,
               alignment: int = DEFAULT_ALIGNMENT) -> Path:
    """Write a GGUF v3 file atomically: nothing is left at `path` if anything fails or is interrupted."""
    path = Path(path)
    value_types = {**{key: (ARRAY, STRING) for key in STRING_ARRAY_KEYS}, **(value_types or {})}
    tensors = list(tensors)
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise LowbitError(f"two tensors are named {t.name!r}; GGUF tensor names must be unique")
        seen.add(t.name)
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = alignment
        value_types = {**value_types, "general.alignment": (UINT32, None)}
    header = [MAGIC, struct.pack("<IQQ", WRITE_VERSION, len(tensors), len(meta))]
    for key, value in meta.items():
        vtype, sub = value_types.get(key) or _infer_value_type(value)
        header += [_pack_value(STRING, key, None), struct.pack("<I", vtype), _pack_value(vtype, value, sub)]
    raws = []
    offset = 0
    for t in tensors:
        raw = t.raw()
        raws.append(raw)
        ne = list(reversed(t.shape))
        header += [_pack_value(STRING, t.name, None), struct.pack("<I", len(ne)),
                   struct.pack(f"<{len(ne)}Q", *ne), struct.pack("<IQ", TENSOR_TYPES[t.type_name][0], offset)]
        offset += -(-len(raw) // alignment) * alignment
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        head = b"".join(header)
        fh.write(head + b"\0" * (-len(head) % alignment))
        for raw in raws:
            fh.write(raw)
            fh.write(b"\0" * (-len(raw) % alignment))
    return path


# -- HF model -> GGUF ------------------------------------------------------------------------------------
def architecture_metadata(config) -> tuple[str, dict[str, Any]]:
    """(gguf architecture, its hyper-parameter keys) for a transformers config, from the registry's family."""
    from lowbit.models.arch import architecture_for

    arch = architecture_for(config)
    if arch.gguf is None:
        raise UnsupportedArchitecture(f"llama.cpp has no {arch.family} architecture, so lowbit cannot export it "
                                      "to GGUF; save it as lowbit, gptq, awq or bnb instead")
    name = arch.gguf.name
    hparams = arch.gguf.hparams(config)
    scaling = _config_value(config, "rope_scaling")
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else None
    if name == "llama" and rope_type == "llama3":
        # written as rope_freqs.weight (rope_freqs_tensor); the original context lets an import recover the config
        hparams[ORIGINAL_CONTEXT_KEY] = int(scaling["original_max_position_embeddings"])
    elif rope_type not in ("default", None):
        raise UnsupportedArchitecture(f"rope scaling {scaling} is not supported by lowbit's GGUF export yet")
    return name, {f"{name}.{key}": value for key, value in hparams.items()}


def rope_freqs_tensor(config) -> TensorToWrite | None:
    """llama.cpp's rope_freqs.weight of a llama3-scaled config (float32 divisors of the rope frequencies, as
    convert_hf_to_gguf writes them), None for other configs."""
    if not is_llama3_scaled(config):
        return None
    divisors = rope_divisors(config).numpy()
    return TensorToWrite(ROPE_FREQS, "F32", tuple(divisors.shape), divisors)


def _config_value(config, *names, default=None):
    from lowbit.models.arch.base import config_value

    return config_value(config, *names, default=default)


def _backend_json(tokenizer) -> dict | None:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def tokenizer_metadata(tokenizer, vocab_size: int, arch: str, model_name: str = "") -> dict[str, Any]:
    """tokenizer.ggml.* and tokenizer.chat_template keys, as convert_hf_to_gguf.py writes them."""
    meta: dict[str, Any] = {}
    spm_file = getattr(tokenizer, "vocab_file", None)
    if spm_file and str(spm_file).endswith(".model") and Path(spm_file).is_file():
        tokens, scores, types = _sentencepiece_vocab(spm_file, tokenizer, vocab_size)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.token_type"] = types
    else:
        data = _backend_json(tokenizer)
        if data is None or data["model"]["type"] != "BPE":
            raise LowbitError("GGUF export needs a sentencepiece (tokenizer.model) or byte-level BPE tokenizer")
        added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        tokens, types = [], []
        for i in range(vocab_size):
            tok = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
            if tok is None:
                tokens.append(f"[PAD{i}]")
                types.append(TOKEN_UNUSED)
            elif i in added:
                tokens.append(tok)
                types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
            else:
                tokens.append(tok)
                types.append(TOKEN_NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_tokenizer_name(data.get("pre_tokenizer"), arch, model_name)
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.token_type"] = types
        meta["tokenizer.ggml.merges"] = merges
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            meta[f"tokenizer.ggml.{role if role != 'pad' else 'padding'}_token_id"] = int(tid)
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(tokenizer, flag, None)
        if isinstance(value, bool):
            meta[f"tokenizer.ggml.{flag}"] = value
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta


def _pre_tokenizer_name(pre: dict | None, arch: str, model_name: str) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex split before BPE), read off the HF pipeline."""
    if arch == "qwen2":
        return "qwen2"
    if "smollm" in model_name.lower():
        return "smollm"
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # GPT-2's split with one token per digit
    return "default"


def _sentencepiece_vocab(spm_file, tokenizer, vocab_size: int):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(spm_file))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i)
                     else TOKEN_UNUSED if sp.is_unused(i) else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL)
    return tokens, scores, types


@dataclass
class ExportEntry:
    """One GGUF tensor to write: its HF sources in HF layout ([out, in]; experts in stack order)."""

    gguf_name: str
    hf_names: list[str]
    sources: list[Any]           # torch.Tensor or QuantizedWeight, one per HF name

    @property
    def shape(self) -> tuple[int, ...]:
        one = tuple(self.sources[0].shape)
        return (len(self.sources), *one) if len(self.sources) > 1 else one


def export_entries(model: nn.Module) -> list[ExportEntry]:
    """The model's tensors as GGUF tensors, in module order, named by gguf-py's TensorNameMap; a tied head is
    left out and expert Linears are gathered into llama.cpp's stacked tensors."""
    from lowbit.models.arch import architecture_for
    from lowbit.models.arch.base import gguf_tensor_name, linear_weight
    from lowbit.runtime.qlinear import QuantLinear

    arch = architecture_for(model)
    n_blocks = len(arch.blocks(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or arch.gguf.always_tied
    entries: dict[str, ExportEntry] = {}

    def add(hf_name: str, source: Any) -> None:
        gname, expert = gguf_tensor_name(arch, hf_name, n_blocks)
        entry = entries.setdefault(gname, ExportEntry(gname, [], []))
        if expert is not None and expert != len(entry.sources):
            raise LowbitError(f"{hf_name}: experts of {gname} are not in order")
        entry.hf_names.append(hf_name)
        entry.sources.append(source)

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if tied and module_name == arch.lm_head_path:
            continue
        if isinstance(module, QuantLinear):
            add(f"{prefix}weight", module.qweight)
        conv = type(module).__name__ == "Conv1D"
        for pname, param in module.named_parameters(recurse=False):
            value = linear_weight(module).detach() if conv and pname == "weight" else param.detach()
            add(f"{prefix}{pname}", value)
    return list(entries.values())


def _planner(model: nn.Module, type: str, tensor_types: list[str] | None, pure: bool, has_imatrix: bool
             ) -> TypePlanner:
    from lowbit.models.arch import architecture_for

    config = model.config
    arch = architecture_for(model)
    n_head = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return TypePlanner(get_mix(type).name, len(arch.blocks(model)), n_head,
                       getattr(config, "num_key_value_heads", None) or n_head,
                       bool(getattr(config, "tie_word_embeddings", False)) or arch.gguf.always_tied,
                       tensor_types, pure, has_imatrix, keep_float=arch.gguf.keep_float)


def plan_gguf_types(model: nn.Module, type: str = "Q4_K_M", tensor_types: list[str] | None = None,
                    pure: bool = False, has_imatrix: bool = False) -> dict[str, str]:
    """{HF parameter name: GGUF type} that export_gguf would write, in file order (llama.cpp's rules)."""
    architecture_metadata(model.config)
    planner = _planner(model, type, tensor_types, pure, has_imatrix)
    out = {}
    for entry in export_entries(model):
        type_name = planner.type_for(entry.gguf_name, entry.shape)
        out.update({hf_name: type_name for hf_name in entry.hf_names})
    return out


def plan_gguf_schemes(model: nn.Module, type: str = "Q4_K_M", tensor_types: list[str] | None = None,
                      pure: bool = False, has_imatrix: bool = False) -> tuple[dict[str, GGMLScheme], tuple[str, ...]]:
    """The llama.cpp mix as a per-layer scheme plan chosen before quantization: ({Linear module name: GGML
    scheme}, Linears kept in float). A Linear the file does not hold (a tied head) or that the mix keeps in
    F16/F32 is kept in float."""
    from lowbit.runtime.surgery import iter_linears

    types = plan_gguf_types(model, type, tensor_types, pure, has_imatrix)
    schemes: dict[str, GGMLScheme] = {}
    floats: list[str] = []
    for name, _ in iter_linears(model):
        type_name = types.get(f"{name}.weight")
        if type_name in CODECS:
            schemes[name] = GGMLScheme(type_name)
        else:
            floats.append(name)
    return schemes, tuple(floats)


def _gguf_rows(arch, config, hf_name: str, values: torch.Tensor) -> torch.Tensor:
    """HF layout -> llama.cpp layout of one tensor: rows reordered (float rows or quantized blocks alike)."""
    from lowbit.models.arch.base import gguf_row_order

    order = gguf_row_order(arch, config, hf_name, values.shape[0])
    return values[order] if order is not None else values


@dataclass(frozen=True)
class GGUFOptions:
    """The GGUF writer's options.

    `type` is a llama.cpp file type (F32, F16, BF16, Q4_0 ... Q8_0, Q2_K_S ... Q6_K); `tensor_types` are
    REGEX=TYPE overrides on GGUF tensor names; `pure` gives every tensor the same type; `importance` maps Linear
    module names to imatrix vectors [in] (or `imatrix_data` names a text file to collect them from,
    lowbit.calibration.imatrix); `progress` logs every tensor."""

    type: str = "Q4_K_M"
    tensor_types: list[str] | None = None
    pure: bool = False
    importance: dict[str, torch.Tensor] | None = None
    imatrix_data: str | os.PathLike | None = None
    progress: bool = True


def export_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, options: GGUFOptions | None = None,
                **fields: Any) -> Path:
    """Write an HF model of any registry family llama.cpp knows (float, or holding quantized Linears) as a
    complete GGUF file, with `options` (a GGUFOptions, or its fields as keywords; unknown ones are errors).

    Layers already quantized to a GGUF scheme (the per-layer plan of `plan_gguf_schemes`, e.g. GPTQ on the
    GGUF grid) are written as they are; float tensors are rounded to the mix's type here.
    """
    from lowbit.formats.registry import writer_options
    from lowbit.models.skeleton import refuse_engine_only

    refuse_engine_only(model, "export GGUF from")     # direct calls; Format.save refuses for every format
    options = writer_options(GGUFOptions, "gguf", options, fields)
    type, tensor_types, pure = options.type, options.tensor_types, options.pure
    importance, imatrix_data, progress = options.importance, options.imatrix_data, options.progress
    from lowbit.models.arch import architecture_for
    from lowbit.models.arch.base import norm_shift
    from lowbit.quantized import QuantizedWeight

    config = model.config
    mix = get_mix(type)
    arch_name, hparams = architecture_metadata(config)
    arch = architecture_for(config)
    if tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    if imatrix_data is not None and importance is None:
        from lowbit.calibration.imatrix import imatrix_from_file

        importance = imatrix_from_file(model, tokenizer, imatrix_data)
    name = Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
    meta: dict[str, Any] = {"general.architecture": arch_name, "general.type": "model", "general.name": name,
                            "general.file_type": mix.file_type, "general.quantization_version": 2, **hparams}
    meta.update(tokenizer_metadata(tokenizer, int(config.vocab_size), arch_name, name))
    planner = _planner(model, mix.name, tensor_types, pure, has_imatrix=bool(importance))
    entries = export_entries(model)
    rope_freqs = rope_freqs_tensor(config)
    out: list[TensorToWrite] = [rope_freqs] if rope_freqs is not None else []
    rerounded = False
    for step, entry in enumerate(entries):
        gname = entry.gguf_name
        type_name = planner.type_for(gname, entry.shape)
        ggml_sources = [s for s in entry.sources if isinstance(s, QuantizedWeight) and isinstance(s.scheme, GGMLScheme)]
        if ggml_sources and len(ggml_sources) == len(entry.sources) and \
                len({s.scheme.type for s in ggml_sources}) == 1:
            # rows are quantized independently, so permuting quantized rows equals quantizing permuted rows
            blocks = [_gguf_rows(arch, config, n, torch.from_numpy(s.scheme.blocks(s)))
                      for n, s in zip(entry.hf_names, ggml_sources)]
            kept = ggml_sources[0].scheme.type
            if kept != type_name:
                log.info("%s keeps its %s blocks (the %s mix would give %s)", gname, kept, mix.name, type_name)
            out.append(TensorToWrite(gname, kept, entry.shape, torch.cat(blocks).numpy()))
            continue
        if any(isinstance(s, QuantizedWeight) for s in entry.sources) and type_name in CODECS and not rerounded:
            # Rounding rounded weights again loses what the method chose (GPTQ's or AWQ's codes); say so, once.
            rerounded = True
            log.warning("%s and other layers: codes that are not GGUF blocks are dequantized and rounded again to "
                        "the GGUF types (for GPTQ on the GGUF grid itself quantize with --method gptq --format "
                        "gguf, i.e. method gptq-gguf)", gname)
        rows = []
        for hf_name, source in zip(entry.hf_names, entry.sources):
            w = (source.dequantize() if isinstance(source, QuantizedWeight) else source).float()
            w = _gguf_rows(arch, config, hf_name, w) + norm_shift(arch, hf_name)
            rows.append(w)
        w = torch.stack(rows) if len(rows) > 1 else rows[0]
        if type_name in CODECS:
            imps = [(importance or {}).get(n.rsplit(".", 1)[0]) for n in entry.hf_names]
            if len(imps) == 1 and imps[0] is not None:
                data = quantize_rows(w.numpy(), type_name, imps[0].float().numpy())
            else:
                flat = w.reshape(-1, w.shape[-1]).numpy()
                data = quantize_rows(flat, type_name, None)
        else:
            data = w.numpy()
        if progress:
            log.info("[%d/%d] %-28s %-5s %s", step + 1, len(entries), gname, type_name, list(w.shape))
        out.append(TensorToWrite(gname, type_name, tuple(w.shape), data))
    return write_gguf(path, meta, out)


# -- GGUF -> lowbit runtime, kept quantized --------------------------------------------------------------
def load_gguf_quantized(path: str | os.PathLike, kernel: str = "auto", engine_only: bool = False, **_: Any):
    """(model, tokenizer) from a GGUF file, kept quantized: Linear layers in block types become QuantLinears
    whose blocks are the file's bytes, memory-mapped (no copy, no decoding: loading takes seconds and the pages
    are shared with other processes and the page cache); a quantized token embedding stays quantized too
    (QuantEmbedding), and a tied output head reads the same blocks. Norms, biases and float tensors load as
    float32.

    `engine_only`: the caller runs the model only through lowbit's engine (generate, serve, bench), so families
    models/skeleton.py can hold load into an EngineSkeleton instead of transformers' model class (about 100 MB
    less resident: transformers' modeling code is never imported); others load as usual."""
    from lowbit.models.arch.base import gguf_row_order, gguf_tensor_name
    from lowbit.models.gguf_import import (
        CONFIG_TENSORS, check_gguf_tensors, float_values, gguf_architecture, gguf_names_of_model, hf_config_from_gguf,
        hf_value, tokenizer_from_gguf,
    )
    from lowbit.models.loading import empty_model_from_config, engine_skeleton
    from lowbit.models.skeleton import EngineSkeleton
    from lowbit.runtime.surgery import install_quantized

    gf = read_gguf(path)  # validates before anything else touches the file
    arch = gguf_architecture(gf)
    config = hf_config_from_gguf(gf, arch)

    def has_bias(module: str) -> bool:
        return gguf_tensor_name(arch, f"{module}.bias", config.num_hidden_layers)[0] in gf.tensors

    model = (engine_skeleton(arch, config, has_bias) if engine_only else None) or empty_model_from_config(config)
    engine_only_model = isinstance(model, EngineSkeleton)
    output_orders: dict[str, torch.Tensor] = {}
    check_gguf_tensors(gf, arch, model)    # names and shapes, before any block is handed to a kernel
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embed_name = arch.embed_path
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, Any] = {}
    embedding = None
    hf_names = gguf_names_of_model(model, arch)
    for tensor in gf.tensors.values():
        if tensor.name in CONFIG_TENSORS:                    # read into the config by hf_config_from_gguf
            continue
        targets = hf_names.get(tensor.name)
        if targets is None:
            raise CorruptFile(f"{path}: tensor {tensor.name} is not part of the {arch.family} layout")
        stacked = targets[0][0] is not None      # experts stacked [experts, out, in] (ffn_*_exps)
        if [e for e, _ in targets] != (list(range(tensor.shape[0])) if stacked else [None]):
            raise CorruptFile(f"{path}: tensor {tensor.name} {list(tensor.shape)} does not hold the "
                              f"{len(targets)} tensors the {arch.family} layout puts in it")
        values = None                               # a float stack is read once for all its experts
        for expert, hf_name in targets:
            module = hf_name.rsplit(".", 1)[0]
            if tensor.is_quantized and hf_name.endswith(".weight") and module in linear_names | {embed_name}:
                blocks = torch.from_numpy(tensor.rows())          # a view of the mapped file
                shape = tuple(tensor.shape)
                if stacked:                                     # one expert's rows of the stack: still a view
                    blocks, shape = blocks.reshape(shape[0], shape[1], -1)[expert], shape[1:]
                order = gguf_row_order(arch, config, hf_name, shape[0])
                if order is not None and engine_only_model:
                    # llama.cpp row order kept (the mapped view); QuantLinear and the compiled step gather the
                    # outputs into HF order (only the engine runs this model: no writer reads its rows)
                    output_orders[module] = torch.argsort(order)
                elif order is not None:
                    blocks = blocks[torch.argsort(order)]          # llama.cpp row order -> HF (a copy of q/k only)
                qw = GGMLScheme(tensor.type_name).from_blocks(blocks, shape)
                if module == embed_name:
                    embedding = qw
                else:
                    quantized[module] = qw
                continue
            if values is None:
                values = float_values(tensor)
            state[hf_name] = hf_value(gf, tensor.name, arch, model, hf_name, expert, values=values)
    tied = bool(config.tie_word_embeddings)
    if tied:
        state.pop(f"{arch.lm_head_path}.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if embedding is not None:
        install_quantized(model, embed_name, embedding, kernel=kernel)
    elif tied:
        model.tie_weights()
    for module, qw in quantized.items():
        install_quantized(model, module, qw, kernel=kernel, output_order=output_orders.get(module))
    if tied and embedding is not None and arch.lm_head_path in linear_names:
        # A tied output projection runs on the embedding's own blocks, as llama.cpp does: no float copy, and
        # the blocks are held once (the embedding reads the same QuantizedWeight).
        install_quantized(model, arch.lm_head_path, embedding, kernel=kernel)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CorruptFile(f"{path}: tensors missing for {missing[:3]}; the file does not match its architecture")
    model.eval()
    tokenizer = tokenizer_from_gguf(path, gf)
    model.lowbit_source_file = gf.without_tokenizer_arrays()   # keeps the mapping open while the model uses its pages
    return model, tokenizer


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


register_format(Format("gguf", write=export_gguf, can_read=is_gguf, read=load_gguf_quantized, options=GGUFOptions,
                       description="llama.cpp GGUF: every block type bit-exact, K-quant mixes"))
