"""Falcon: parallel attention + MLP reading one LayerNorm (7B layout; 40B's ln_attn/ln_mlp also covered),
multi-query attention in a fused query_key_value grouped per KV head, GELU MLP, rotary positions."""
from lowbit.models.arch.base import Architecture, BlockLayout, GGUFSpec, NormKind, ScaleGroup

QKV, H4H = "self_attention.query_key_value", "mlp.dense_h_to_4h"


def _n_head_kv(config) -> int:
    if getattr(config, "new_decoder_architecture", False):
        return int(config.num_kv_heads)
    return 1 if getattr(config, "multi_query", True) else int(config.num_attention_heads)


def _engine_refuses(config) -> str | None:
    """The 7B layout runs in lowbit's decoder; 40B's ln_attn/ln_mlp, sequential blocks and ALiBi do not."""
    if getattr(config, "new_decoder_architecture", False):
        return "ln_attn / ln_mlp blocks (new_decoder_architecture)"
    if getattr(config, "alibi", False):
        return "alibi positions"
    if not getattr(config, "parallel_attn", True):
        return "attention then MLP with a second norm (parallel_attn=False)"
    return None


def _hparams(config):
    return {"context_length": int(getattr(config, "max_position_embeddings", None) or 2048),
            "embedding_length": int(config.hidden_size), "feed_forward_length": 4 * int(config.hidden_size),
            "block_count": int(config.num_hidden_layers), "attention.head_count": int(config.num_attention_heads),
            "attention.head_count_kv": _n_head_kv(config),
            "attention.layer_norm_epsilon": float(config.layer_norm_epsilon), "vocab_size": int(config.vocab_size)}


def _config(meta):
    n_head, n_kv = int(meta["attention.head_count"]), int(meta.get("attention.head_count_kv", 1))
    return {"hidden_size": int(meta["embedding_length"]), "num_hidden_layers": int(meta["block_count"]),
            "num_attention_heads": n_head, "multi_query": n_kv == 1, "num_kv_heads": n_kv,
            "new_decoder_architecture": False, "parallel_attn": True, "bias": False, "alibi": False,
            "layer_norm_epsilon": float(meta.get("attention.layer_norm_epsilon", 1e-5))}


ARCHITECTURE = Architecture(
    family="falcon", model_types=("falcon",), hf_classes=("FalconForCausalLM",),
    blocks_path="transformer.h", embed_path="transformer.word_embeddings", final_norm_path="transformer.ln_f",
    lm_head_path="lm_head",
    sequential=((QKV, H4H), ("self_attention.dense",), ("mlp.dense_4h_to_h",)),
    scale_groups=(
        # one norm feeds attention and MLP: the whole block is what the scale must preserve
        ScaleGroup("input_layernorm", (QKV, H4H), "", input_of=QKV),
        ScaleGroup("ln_attn", (QKV,), "self_attention"),
        ScaleGroup("ln_mlp", (H4H,), "mlp"),
    ),
    norm=NormKind.LAYER, activation="gelu", gated_mlp=False, parallel_attn_mlp=True,
    # one norm feeds attention and MLP (7B layout)
    layout=BlockLayout(mlp_norm="input_layernorm"),
    engine_stages=((QKV,), ("self_attention.dense",), (H4H,), ("mlp.dense_4h_to_h",)),
    kv_heads_of=_n_head_kv, engine_refuses=_engine_refuses,
    fused={QKV: ("q", "k", "v")}, no_clip=(QKV,), tied_head="config",
    gguf=GGUFSpec("FALCON", qkv_layout="kv_groups", always_tied=True, hparams=_hparams, config_from=_config),
)
