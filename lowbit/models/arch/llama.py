"""Llama, and the families that share its layout exactly (Mistral, SmolLM3)."""
from lowbit.models.arch.base import Architecture, Fold, GGUFSpec, ScaleGroup, llama_like_config, llama_like_hparams

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")

# The sequential order and AWQ groups of every Llama-style block (pre-norm attention, then pre-norm SwiGLU).
LLAMA_SEQUENTIAL = (ATTN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))
LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ATTN, "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", Fold.LINEAR),
    ScaleGroup("post_attention_layernorm", MLP_IN, "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", Fold.LINEAR),
)
LLAMA_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")

ARCHITECTURE = Architecture(
    family="llama",
    model_types=("llama", "mistral", "smollm3"),
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM", "SmolLM3ForCausalLM"),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=LLAMA_SEQUENTIAL, scale_groups=LLAMA_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    sliding_window=False,
    gguf=GGUFSpec("LLAMA", permute_qk=True, hparams=llama_like_hparams, config_from=llama_like_config),
)
