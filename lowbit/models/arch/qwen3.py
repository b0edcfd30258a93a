"""Qwen3: the Llama layout with RMSNorm on each head's queries and keys."""
from lowbit.models.arch.base import Architecture, GGUFSpec, llama_like_config, llama_like_hparams
from lowbit.models.arch.llama import LLAMA_NO_CLIP, LLAMA_SCALE_GROUPS, LLAMA_SEQUENTIAL

ARCHITECTURE = Architecture(
    family="qwen3", model_types=("qwen3",), hf_classes=("Qwen3ForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL, scale_groups=LLAMA_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    qk_norm=True, layer_types="layer_types",    # sliding-window layers with use_sliding_window
    gguf=GGUFSpec("QWEN3", hparams=llama_like_hparams, config_from=llama_like_config),
)
