"""GPT-2: learned positions, LayerNorms with bias, Conv1D layers (weights stored [in, out]), GELU MLP."""
from lowbit.models.arch.base import Architecture, BlockLayout, GGUFSpec, NormKind, ScaleGroup


def _hparams(config):
    return {"context_length": int(config.n_positions), "embedding_length": int(config.n_embd),
            "feed_forward_length": int(config.n_inner or 4 * config.n_embd), "block_count": int(config.n_layer),
            "attention.head_count": int(config.n_head),
            "attention.layer_norm_epsilon": float(config.layer_norm_epsilon), "vocab_size": int(config.vocab_size)}


def _config(meta):
    return {"n_embd": int(meta["embedding_length"]), "n_layer": int(meta["block_count"]),
            "n_head": int(meta["attention.head_count"]), "n_positions": int(meta.get("context_length", 1024)),
            "n_inner": int(meta["feed_forward_length"]),
            "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5))}


ARCHITECTURE = Architecture(
    family="gpt2", model_types=("gpt2",), hf_classes=("GPT2LMHeadModel",),
    blocks_path="transformer.h", embed_path="transformer.wte", final_norm_path="transformer.ln_f",
    lm_head_path="lm_head",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scale_groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
        ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
        ScaleGroup("", ("mlp.c_proj",), "mlp.c_proj"),  # GELU sits before c_proj: scales cannot be folded
    ),
    norm=NormKind.LAYER, activation="gelu_tanh", gated_mlp=False, position="learned",
    position_embed_path="transformer.wpe", layout=BlockLayout(input_norm="ln_1", mlp_norm="ln_2"),
    qkv_bias=True, out_bias=True, mlp_bias=True, fused={"attn.c_attn": ("q", "k", "v")},
    no_clip=("attn.c_attn",),
    gguf=GGUFSpec("GPT2", always_tied=True, hparams=_hparams, config_from=_config),
)
