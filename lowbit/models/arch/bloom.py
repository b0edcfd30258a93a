"""BLOOM: ALiBi positions, LayerNorms with bias (also one right after the embeddings), GELU MLP, a fused
query_key_value whose rows are interleaved per head (llama.cpp wants q|k|v)."""
from lowbit.models.arch.base import Architecture, GGUFSpec, NormKind, ScaleGroup


def _hparams(config):
    return {"context_length": int(getattr(config, "seq_length", None) or 2048),
            "embedding_length": int(config.hidden_size), "feed_forward_length": 4 * int(config.hidden_size),
            "block_count": int(config.n_layer), "attention.head_count": int(config.n_head),
            "attention.head_count_kv": int(config.n_head),
            "attention.layer_norm_epsilon": float(config.layer_norm_epsilon), "vocab_size": int(config.vocab_size)}


def _config(meta):
    return {"hidden_size": int(meta["embedding_length"]), "n_layer": int(meta["block_count"]),
            "n_head": int(meta["attention.head_count"]),
            "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5))}


ARCHITECTURE = Architecture(
    family="bloom", model_types=("bloom",), hf_classes=("BloomForCausalLM",),
    blocks_path="transformer.h", embed_path="transformer.word_embeddings", final_norm_path="transformer.ln_f",
    lm_head_path="lm_head",
    sequential=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attention.query_key_value",), "self_attention"),
        ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
    ),
    norm=NormKind.LAYER, activation="gelu_tanh", activation_class="BloomGelu", gated_mlp=False, position="alibi",
    embed_norm_path="transformer.word_embeddings_layernorm",
    qkv_bias=True, out_bias=True, mlp_bias=True,
    fused={"self_attention.query_key_value": ("q", "k", "v")}, no_clip=("self_attention.query_key_value",),
    tied_head="always",
    gguf=GGUFSpec("BLOOM", qkv_layout="heads_interleaved", always_tied=True, hparams=_hparams, config_from=_config),
)
