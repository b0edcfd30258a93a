"""Gemma 2: Gemma with sandwich norms (after attention and after the MLP), alternating sliding-window
layers and tanh soft-capping of attention scores and final logits."""
from lowbit.models.arch.base import (
    SANDWICH_LAYOUT, Architecture, Fold, GGUFSpec, NormKind, ScaleGroup, llama_like_config,
)
from lowbit.models.arch.gemma import _hparams as gemma_hparams
from lowbit.models.arch.llama import ATTN, LLAMA_NO_CLIP, LLAMA_SEQUENTIAL, MLP_IN

# post_attention_layernorm normalises the attention *output*; the MLP reads pre_feedforward_layernorm.
GEMMA2_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ATTN, "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", Fold.LINEAR),
    ScaleGroup("pre_feedforward_layernorm", MLP_IN, "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", Fold.LINEAR),
)


def _hparams(config):
    out = gemma_hparams(config)
    out["attention.sliding_window"] = int(config.sliding_window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            out[key] = float(getattr(config, key))
    return out


def _config(meta):
    out = llama_like_config(meta)
    out["sliding_window"] = int(meta.get("attention.sliding_window", 4096))
    out["query_pre_attn_scalar"] = out.get("head_dim", out["hidden_size"] // out["num_attention_heads"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        out[key] = float(meta[key]) if key in meta else None
    return out


ARCHITECTURE = Architecture(
    family="gemma2", model_types=("gemma2",), hf_classes=("Gemma2ForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL, scale_groups=GEMMA2_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    norm=NormKind.RMS_PLUS_ONE, activation="gelu_tanh", activation_config="hidden_activation",
    embed_scale=True, sandwich_norm=True,
    layout=SANDWICH_LAYOUT,
    sliding_window=True, logit_softcap=True, layer_types="layer_types",
    gguf=GGUFSpec("GEMMA2", norm_shift=1.0, hparams=_hparams, config_from=_config),
)
