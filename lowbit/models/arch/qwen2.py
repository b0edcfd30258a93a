"""Qwen2: the Llama layout with biases on q/k/v."""
from lowbit.models.arch.base import Architecture, GGUFSpec, llama_like_config, llama_like_hparams
from lowbit.models.arch.llama import LLAMA_NO_CLIP, LLAMA_SCALE_GROUPS, LLAMA_SEQUENTIAL


def _config(meta):
    return {**llama_like_config(meta), "use_sliding_window": False}


ARCHITECTURE = Architecture(
    family="qwen2", model_types=("qwen2",), hf_classes=("Qwen2ForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL, scale_groups=LLAMA_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    qkv_bias=True, layer_types="layer_types",   # sliding-window layers with use_sliding_window
    gguf=GGUFSpec("QWEN2", hparams=llama_like_hparams, config_from=_config),
)
