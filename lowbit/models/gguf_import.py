"""GGUF -> Hugging Face model: parse and validate the file with lowbit's own reader (formats.gguf.read_gguf),
find its family in the architecture registry from the header alone (an unknown architecture is refused
before any weight is read), build the transformers config from the family's hyper-parameter map, name
every tensor with gguf-py's TensorNameMap, undo llama.cpp's layout changes (q/k rope permutation, fused
q|k|v order, Gemma's 1 + w norms, stacked experts) and build the tokenizer from the metadata."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFile, LowbitError
from lowbit.models.arch import architecture_for_gguf
from lowbit.models.rope_scaling import ROPE_FREQS, config_with_rope_freqs
from lowbit.models.validate import check_hparams
from lowbit.models.arch.base import (
    Architecture, gguf_row_order, gguf_tensor_name, norm_shift, permute_qk, unpermute_qk,  # noqa: F401
)

log = logging.getLogger("lowbit")

# tensors hf_config_from_gguf builds the config from (rope scaling), which no model parameter holds
CONFIG_TENSORS = (ROPE_FREQS,)


def read_header(path: str | Path):
    """The validated GGUFFile (tensor data stay on disk, memory-mapped) and its registry Architecture."""
    from lowbit.formats.gguf import read_gguf

    gf = read_gguf(path)
    return gf, gguf_architecture(gf)


def gguf_architecture(gf) -> Architecture:
    return architecture_for_gguf(gf.get("general.architecture"), gf.metadata)


def hf_config_from_gguf(gf, arch: Architecture | None = None) -> Any:
    """A transformers config built from the GGUF's hyper-parameters by the family's map."""
    from transformers import AutoConfig

    from lowbit.models.validate import check_gguf_header

    check_gguf_header(gf)               # what `lowbit inspect` checks: bounded values, blocks and shapes agree
    arch = arch or gguf_architecture(gf)
    prefix = f"{gf.get('general.architecture')}."
    meta = {k[len(prefix):]: v for k, v in gf.metadata.items() if k.startswith(prefix)}
    embedding = gf.tensors.get("token_embd.weight")
    if embedding is None:
        raise CorruptFile(f"{gf.path}: no token_embd.weight tensor; the file does not hold a language model")
    try:
        kwargs = arch.gguf.config_from(meta)
        kwargs["vocab_size"] = int(meta.get("vocab_size", embedding.shape[0]))
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise CorruptFile(f"{gf.path}: {arch.gguf.name} hyper-parameter missing or malformed ({exc})") from None
    check_hparams(kwargs, gf.path)      # block_count = 2**32 - 1 fails here, before a skeleton is allocated
    kwargs.update(
        tie_word_embeddings=arch.gguf.always_tied or "output.weight" not in gf.tensors,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"), eos_token_id=gf.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=gf.get("tokenizer.ggml.padding_token_id"), dtype="float32")

    def build(fields: dict[str, Any]):
        try:
            return AutoConfig.for_model(arch.model_types[0], **fields)
        except Exception as exc:  # noqa: BLE001  (transformers validates fields with its own exception types)
            detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            raise CorruptFile(f"{gf.path}: its {arch.gguf.name} hyper-parameters do not make a valid model "
                              f"({detail})") from None

    if ROPE_FREQS in gf.tensors:       # Llama 3.x rope scaling: the divisors are the only record of it
        return config_with_rope_freqs(gf, arch.gguf.name, kwargs, build)
    return build(kwargs)


def _hf_parameters(model: nn.Module) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{HF name: (shape as [out, in], stored transposed)} of every parameter (Conv1D weights transposed)."""
    out = {}
    for module_name, module in model.named_modules():
        conv = type(module).__name__ == "Conv1D"
        for pname, p in module.named_parameters(recurse=False):
            shape = tuple(p.shape)
            transposed = conv and pname == "weight"
            out[f"{module_name}.{pname}" if module_name else pname] = (shape[::-1] if transposed else shape,
                                                                      transposed)
    return out


def gguf_names_of_model(model: nn.Module, arch: Architecture) -> dict[str, list[tuple[int | None, str]]]:
    """{GGUF name: [(expert index or None, HF name), ...]} for every parameter of `model`."""
    n_blocks = len(arch.blocks(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, list[tuple[int | None, str]]] = {}
    for hf_name in _hf_parameters(model):
        if tied and hf_name.startswith(f"{arch.lm_head_path}."):
            continue
        gname, expert = gguf_tensor_name(arch, hf_name, n_blocks)
        out.setdefault(gname, []).append((expert, hf_name))
    return out


def expected_gguf_tensors(model: nn.Module, arch: Architecture) -> dict[str, tuple[int, ...]]:
    """{GGUF name: shape in PyTorch order} of every tensor the file must hold for `model`'s configuration (a stack
    of experts is [experts, out, in])."""
    params = _hf_parameters(model)
    out = {}
    for gname, targets in gguf_names_of_model(model, arch).items():
        shape = params[targets[0][1]][0]
        out[gname] = (len(targets), *shape) if targets[0][0] is not None else shape
    return out


def check_gguf_tensors(gf, arch: Architecture, model: nn.Module) -> None:
    """The file's tensors are exactly the ones its architecture and hyper-parameters need, with their shapes
    (a tensor with 65,536 outputs where the heads need 64, a layer beyond block_count, a missing tensor: errors
    naming them, before any block reaches a kernel)."""
    from lowbit.models.validate import check_tensor_set

    weights = {n: t.shape for n, t in gf.tensors.items() if n not in CONFIG_TENSORS}
    check_tensor_set(expected_gguf_tensors(model, arch), weights, gf.path,
                     what=f"the {arch.family} layout of its metadata")


def to_hf_layout(arch: Architecture, config, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """One tensor in llama.cpp layout -> HF layout (rows reordered, norm shift removed)."""
    order = gguf_row_order(arch, config, hf_name, w.shape[0])
    if order is not None:
        w = w[torch.argsort(order)]
    shift = norm_shift(arch, hf_name)
    return w - shift if shift else w


def float_values(tensor) -> torch.Tensor:
    """float32 values of one validated GGUF tensor in PyTorch order, dequantized by gguf-py (vectorised numpy;
    lowbit's own codecs are the bit-exact reference and the quantizers)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if not tensor.is_quantized:
        return torch.from_numpy(np.array(tensor.to_float()))
    values = quants.dequantize(np.asarray(tensor.rows()), GGMLQuantizationType[tensor.type_name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(tensor.shape))


def hf_value(gf, gguf_name: str, arch: Architecture, model: nn.Module, hf_name: str,
             expert: int | None = None, params: dict | None = None, values: torch.Tensor | None = None
             ) -> torch.Tensor:
    """The float32 HF tensor `hf_name` read from GGUF tensor `gguf_name` (one expert of a stack), shape-checked."""
    params = params or _hf_parameters(model)
    if values is None:
        values = float_values(gf.tensors[gguf_name])
    w = values[expert] if expert is not None else values
    shape, transposed = params[hf_name]
    if tuple(w.shape) != shape:
        raise CorruptFile(f"{gf.path}: tensor {gguf_name} has shape {list(w.shape)}, but the model's "
                          f"hyper-parameters need {list(shape)} for {hf_name}")
    w = to_hf_layout(arch, model.config, hf_name, w)
    return w.t().contiguous() if transposed else w


def gguf_state_dict(gf, arch: Architecture, model: nn.Module) -> dict[str, torch.Tensor]:
    """HF state dict (float32, dequantized) of every tensor in the GGUF, in HF layout."""
    check_gguf_tensors(gf, arch, model)
    params = _hf_parameters(model)
    names = gguf_names_of_model(model, arch)
    state = {}
    for gname, targets in names.items():
        values = float_values(gf.tensors[gname])   # a stack of experts is read once
        for expert, hf_name in targets:
            state[hf_name] = hf_value(gf, gname, arch, model, hf_name, expert, params, values)
    return state


def tokenizer_from_gguf(path: str | Path, gf=None):
    """The tokenizer stored in the GGUF metadata (vocab, merges/scores, special ids, chat template).

    Built from lowbit's parsed metadata with transformers' own GGUF tokenizer converters: transformers'
    `from_pretrained(gguf_file=...)` re-parses the whole file with gguf-py's reader (15 s for SmolLM2's 49k
    vocabulary, a minute for a 150k one, against 1 s here; the tokens are identical) and refuses architectures
    it has no model mapping for (gptneox, gemma, bloom ...), although the tokenizer only depends on
    tokenizer.ggml.*. There is no second parser to fall back on: metadata the converters refuse is an error."""
    path = Path(path)
    try:
        return _tokenizer_from_metadata(gf if gf is not None else read_header(path)[0])
    except LowbitError:
        raise
    except Exception as exc:  # transformers' converters raise many types for metadata they do not take
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{path}: the tokenizer metadata (tokenizer.ggml.*) cannot build a tokenizer "
                          f"({type(exc).__name__}: {detail}); re-convert the file with a current llama.cpp") from None


def _tokenizer_from_metadata(gf):
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = gf.metadata
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, options = grouped["tokenizer"], grouped["tokenizer_config"]
    backend, extra = convert_gguf_tokenizer(meta.get("general.architecture", ""), tokenizer)
    tokens = tokenizer.get("tokens", [])
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        token_id = tokenizer.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            options[role] = tokens[token_id]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options, **extra)


def load_gguf_as_hf(path: str | Path):
    """(model, tokenizer): a float32 transformers model and tokenizer from a GGUF file."""
    from lowbit.models.loading import empty_model_from_config

    gf, arch = read_header(path)   # an unknown architecture fails here, before any weight is touched
    config = hf_config_from_gguf(gf, arch)
    model = empty_model_from_config(config)
    state = gguf_state_dict(gf, arch, model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m.startswith(f"{arch.lm_head_path}."))]
    if missing or unexpected:
        raise CorruptFile(f"{path}: tensors do not match the {config.model_type} layout "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, tokenizer_from_gguf(path, gf)


def open_gguf(path: str | Path):
    """Compatibility: the validated GGUFFile of `path` (lowbit's one GGUF parser)."""
    from lowbit.formats.gguf import read_gguf

    if not Path(path).is_file():
        raise LowbitError(f"GGUF file {path} not found")
    return read_gguf(path)
