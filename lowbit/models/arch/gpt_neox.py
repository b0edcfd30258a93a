"""GPT-NeoX (Pythia): LayerNorms with bias, partial rotary, parallel attention + MLP, a fused
query_key_value interleaved per head, GELU MLP."""
from lowbit.models.arch.base import Architecture, GGUFSpec, NormKind, ScaleGroup, config_value


def _rotary_fraction(config) -> float:
    return float(config_value(config, "partial_rotary_factor", "rotary_pct", default=1.0))


def _hparams(config):
    head_dim = config.hidden_size // config.num_attention_heads
    return {"context_length": int(config.max_position_embeddings), "embedding_length": int(config.hidden_size),
            "block_count": int(config.num_hidden_layers), "feed_forward_length": int(config.intermediate_size),
            "rope.dimension_count": int(_rotary_fraction(config) * head_dim),
            "rope.freq_base": float(config_value(config, "rope_theta", "rotary_emb_base", default=10000.0)),
            "attention.head_count": int(config.num_attention_heads),
            "use_parallel_residual": bool(config.use_parallel_residual),
            "attention.layer_norm_epsilon": float(config.layer_norm_eps), "vocab_size": int(config.vocab_size)}


def _config(meta):
    hidden, n_head = int(meta["embedding_length"]), int(meta["attention.head_count"])
    fraction = int(meta.get("rope.dimension_count", hidden // n_head)) / (hidden // n_head)
    return {"hidden_size": hidden, "num_hidden_layers": int(meta["block_count"]), "num_attention_heads": n_head,
            "intermediate_size": int(meta["feed_forward_length"]),
            "max_position_embeddings": int(meta.get("context_length", 2048)),
            "use_parallel_residual": bool(meta.get("use_parallel_residual", True)),
            "layer_norm_eps": float(meta.get("attention.layer_norm_epsilon", 1e-5)),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base", 10000.0)),
                                "partial_rotary_factor": fraction}}


ARCHITECTURE = Architecture(
    family="gpt_neox", model_types=("gpt_neox",), hf_classes=("GPTNeoXForCausalLM",),
    blocks_path="gpt_neox.layers", embed_path="gpt_neox.embed_in", final_norm_path="gpt_neox.final_layer_norm",
    lm_head_path="lm_head",
    sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ),
    norm=NormKind.LAYER, activation="gelu", gated_mlp=False, position="partial_rope", parallel_attn_mlp=True,
    parallel_switch="use_parallel_residual",
    qkv_bias=True, out_bias=True, mlp_bias=True,
    fused={"attention.query_key_value": ("q", "k", "v")}, no_clip=("attention.query_key_value",),
    gguf=GGUFSpec("GPTNEOX", qkv_layout="heads_interleaved", hparams=_hparams, config_from=_config),
)
