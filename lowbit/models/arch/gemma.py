"""Gemma (1): the Llama layout with RMSNorm scaling by (1 + w), GELU-tanh gating and sqrt(hidden)-scaled
embeddings. llama.cpp stores the norm weights as 1 + w (norm_shift)."""
from lowbit.models.arch.base import (
    Architecture, GGUFSpec, NormKind, llama_like_config, llama_like_hparams,
)
from lowbit.models.arch.llama import LLAMA_NO_CLIP, LLAMA_SCALE_GROUPS, LLAMA_SEQUENTIAL


def _hparams(config):
    out = llama_like_hparams(config)
    out["attention.key_length"] = out["attention.value_length"] = int(config.head_dim)
    out.pop("rope.dimension_count")
    return out


ARCHITECTURE = Architecture(
    family="gemma", model_types=("gemma",), hf_classes=("GemmaForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL, scale_groups=LLAMA_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    norm=NormKind.RMS_PLUS_ONE, activation="gelu_tanh", embed_scale=True,
    gguf=GGUFSpec("GEMMA", norm_shift=1.0, hparams=_hparams, config_from=llama_like_config),
)
