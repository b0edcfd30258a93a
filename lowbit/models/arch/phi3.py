"""Phi-3: Llama-like, but q/k/v live in one fused qkv_proj and gate/up in one gate_up_proj (as llama.cpp
stores them too: attn_qkv and a double-height ffn_up)."""
from lowbit.models.arch.base import Architecture, Fold, GGUFSpec, ScaleGroup, llama_like_config, llama_like_hparams

ARCHITECTURE = Architecture(
    family="phi3", model_types=("phi3",), hf_classes=("Phi3ForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        # act(gate) * up: a scale on the product can be folded into the `up` half (the last rows) only
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", Fold.LINEAR_LAST_ROWS),
    ),
    fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
    no_clip=("self_attn.qkv_proj",), position="partial_rope",
    gguf=GGUFSpec("PHI3", hparams=llama_like_hparams, config_from=llama_like_config),
)
