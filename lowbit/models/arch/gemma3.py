"""Gemma 3 (text): the worked example of an architecture file (see the README, "Adding an architecture").

What is special about the family, and where each fact is used:
- RMSNorm scales by (1 + w)  -> norm=RMS_PLUS_ONE: AWQ folds a scale s as w' = (1 + w) / s - 1; llama.cpp
  stores 1 + w (GGUFSpec.norm_shift=1.0, added on export and removed on import).
- sandwich norms: post_attention_layernorm normalises the attention output, and the MLP reads
  pre_feedforward_layernorm -> the AWQ scale groups below name that norm.
- per-head RMSNorm on queries and keys (qk_norm), GELU-tanh gating, embeddings scaled by sqrt(hidden).
- five sliding-window layers (local rope base 10 000) for each global one (rope base rope_theta).
- llama.cpp architecture "gemma3"; tensor names come from gguf-py's TensorNameMap for MODEL_ARCH.GEMMA3.
"""
from lowbit.errors import UnsupportedArchitecture
from lowbit.models.arch.base import (
    SANDWICH_LAYOUT, Architecture, GGUFSpec, NormKind, config_value, llama_like_config,
)
from lowbit.models.arch.gemma import _hparams as gemma_hparams
from lowbit.models.arch.gemma2 import GEMMA2_SCALE_GROUPS
from lowbit.models.arch.llama import LLAMA_NO_CLIP, LLAMA_SEQUENTIAL


def _global_rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    full = rope.get("full_attention") if isinstance(rope, dict) else None
    if isinstance(full, dict):
        if full.get("rope_type", "default") != "default":
            raise UnsupportedArchitecture(f"Gemma 3 rope scaling {full} is not supported by lowbit's GGUF export")
        return float(full.get("rope_theta", 1e6))
    return float(config_value(config, "rope_theta", default=1e6))


def _hparams(config) -> dict:
    # llama.cpp hard-codes Gemma 3's layer pattern (five sliding-window layers, then a global one) and the
    # local rope base of 10 000: a model that differs cannot be written faithfully.
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", pattern) or pattern) != pattern:
        raise UnsupportedArchitecture("this Gemma 3 model's layer_types differ from llama.cpp's fixed pattern "
                                      "(5 sliding-window layers, then 1 global): GGUF export would change it")
    rope = getattr(config, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    if float(local.get("rope_theta", 10000.0)) != 10000.0:
        raise UnsupportedArchitecture("llama.cpp fixes Gemma 3's local rope base at 10000; this model uses "
                                      f"{local.get('rope_theta')}")
    out = gemma_hparams(config)
    out["rope.freq_base"] = _global_rope_theta(config)
    out["attention.sliding_window"] = int(config.sliding_window)
    return out


def _config(meta: dict) -> dict:
    out = llama_like_config(meta)
    out["sliding_window"] = int(meta.get("attention.sliding_window", 512))
    out["query_pre_attn_scalar"] = out.get("head_dim", out["hidden_size"] // out["num_attention_heads"])
    return out


ARCHITECTURE = Architecture(
    family="gemma3",
    model_types=("gemma3_text",),
    hf_classes=("Gemma3ForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL,
    scale_groups=GEMMA2_SCALE_GROUPS,
    no_clip=LLAMA_NO_CLIP,
    norm=NormKind.RMS_PLUS_ONE, activation="gelu_tanh", activation_config="hidden_activation",
    embed_scale=True, sandwich_norm=True,
    layout=SANDWICH_LAYOUT,
    qk_norm=True, sliding_window=True, layer_types="layer_types",
    gguf=GGUFSpec("GEMMA3", norm_shift=1.0, hparams=_hparams, config_from=_config),
)
