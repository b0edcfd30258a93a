"""GGUF -> Hugging Face model: dequantize every tensor, map llama.cpp names and hyper-parameters to the
HF architecture, undo convert_hf_to_gguf's q/k row permutation, and build the tokenizer from the metadata."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import CorruptFile, LowbitError, UnsupportedArchitecture

log = logging.getLogger("lowbit")

# llama.cpp tensor name (per block, after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF general.architecture -> HF model_type; llama stores q/k rows permuted for its rope layout.
_ARCHES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_QK = {"llama", "mistral"}


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (clear error if unknown)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise UnsupportedArchitecture(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in lowbit's map")


def gguf_tensor_name(hf_name: str) -> str:
    """Inverse of hf_tensor_name."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m:
        inv = {v: k for k, v in _BLOCK_NAMES.items()}
        if m.group(2) in inv:
            return f"blk.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(.+)\.(weight|bias)", hf_name)
    inv = {v: k for k, v in _GLOBAL_NAMES.items()}
    if m and m.group(1) in inv:
        return f"{inv[m.group(1)]}.{m.group(2)}"
    raise UnsupportedArchitecture(f"tensor {hf_name!r} has no GGUF name in lowbit's map")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order of a q/k projection (interleaved rope halves), as convert_hf_to_gguf does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp -> HF row order of a q/k projection (inverse of permute_qk)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | Path):
    """A gguf.GGUFReader for `path`, turning the reader's low-level failures into CorruptFile."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"GGUF file {path} not found")
    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise CorruptFile(f"{path} is not a readable GGUF file ({exc}); it may be truncated or corrupt") from exc


def field_value(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def hf_config_from_gguf(reader) -> Any:
    """A transformers config built from the GGUF's architecture hyper-parameters."""
    from transformers import AutoConfig

    arch = field_value(reader, "general.architecture")
    if arch not in _ARCHES:
        raise UnsupportedArchitecture(f"GGUF architecture {arch!r} is not supported; lowbit imports "
                                      f"{', '.join(sorted(_ARCHES))}")
    g = lambda k, d=None: field_value(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    kwargs = dict(
        hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=n_head,
        num_key_value_heads=int(g("attention.head_count_kv", n_head)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=int(g("context_length", 2048)),
        vocab_size=int(g("vocab_size", int(embd.shape[-1]))),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        dtype="float32",
    )
    key_length = g("attention.key_length")
    if key_length is not None:
        kwargs["head_dim"] = int(key_length)
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    return AutoConfig.for_model(_ARCHES[arch], **kwargs)


def dequantize_tensor(tensor) -> np.ndarray:
    """float32 array in HF layout ([out, in] for matrices) of one GGUF tensor, any supported block type."""
    from gguf import quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise CorruptFile(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which lowbit cannot "
                          "dequantize; re-export it as F16/F32 or a Q4_0..Q8_0/K-quant type") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(values, dtype=np.float32, copy=True).reshape(shape)


def gguf_state_dict(reader, config) -> dict[str, torch.Tensor]:
    """HF state dict (float32) of every tensor in the GGUF, q/k rows restored to HF order where needed."""
    arch = field_value(reader, "general.architecture")
    state = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        w = torch.from_numpy(dequantize_tensor(tensor))
        if arch in _PERMUTED_QK and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, config.num_attention_heads)
        elif arch in _PERMUTED_QK and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, config.num_key_value_heads)
        state[name] = w
    return state


def tokenizer_from_gguf(path: str | Path):
    """The tokenizer stored in the GGUF metadata (vocab, merges/scores, special ids, chat template)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for unsupported tokenizer metadata
        raise CorruptFile(f"could not build a tokenizer from {path}'s metadata ({exc})") from exc


def load_gguf_as_hf(path: str | Path):
    """(model, tokenizer): a float32 transformers model and tokenizer from a GGUF file."""
    from lowbit.models.loading import empty_model_from_config

    reader = open_gguf(path)
    config = hf_config_from_gguf(reader)
    state = gguf_state_dict(reader, config)
    model = empty_model_from_config(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CorruptFile(f"{path}: tensors do not match the {config.model_type} layout "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    return model, tokenizer_from_gguf(path)
