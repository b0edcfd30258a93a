"""Qwen-MoE: Qwen2-MoE (q/k/v biases, a shared expert behind a sigmoid gate) and Qwen3-MoE (q/k norm, no
shared expert); llama.cpp's qwen2moe / qwen3moe with stacked expert tensors."""
import functools

from lowbit.errors import LowbitError
from lowbit.models.arch.base import (
    Architecture, Experts, Fold, GGUFSpec, ScaleGroup, llama_like_config, llama_like_hparams, moe_config,
    moe_hparams,
)
from lowbit.models.arch.llama import ATTN, LLAMA_NO_CLIP
from lowbit.models.arch.mixtral import EXPERT_IN

SHARED_IN = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")


def _hparams(config, renormalizes: bool):
    if bool(getattr(config, "norm_topk_prob", False)) != renormalizes:
        raise LowbitError(
            f"this {config.model_type} model has norm_topk_prob={getattr(config, 'norm_topk_prob', False)}, but "
            f"llama.cpp's {config.model_type} always {'divides' if renormalizes else 'keeps'} the top-k expert "
            f"weights {'by' if renormalizes else 'without'} their sum; a GGUF file cannot say otherwise "
            f"(export as lowbit's native format instead)")
    out = {**llama_like_hparams(config), **moe_hparams(config)}
    out["expert_feed_forward_length"] = int(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        out["expert_shared_feed_forward_length"] = int(config.shared_expert_intermediate_size)
    return out


def _config(meta, renormalizes: bool):
    out = {**llama_like_config(meta), **moe_config(meta, "num_experts")}
    out["norm_topk_prob"] = renormalizes
    out["moe_intermediate_size"] = int(meta["expert_feed_forward_length"])
    if "expert_shared_feed_forward_length" in meta:
        out["shared_expert_intermediate_size"] = int(meta["expert_shared_feed_forward_length"])
    return out


def _moe(family, model_type, cls, arch, shared: bool, qkv_bias: bool, qk_norm: bool,
         renormalizes: bool, layer_types: str = "") -> Architecture:
    """`renormalizes`: whether llama.cpp's `arch` divides the top-k expert weights by their sum (fixed in its
    graph, no GGUF key; transformers' norm_topk_prob); `layer_types`: Architecture.layer_types."""
    expert_in = EXPERT_IN + (SHARED_IN if shared else ())
    groups = (
        ScaleGroup("input_layernorm", ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", Fold.LINEAR),
        ScaleGroup("post_attention_layernorm", expert_in, "mlp",
                   companions=("mlp.gate",) + (("mlp.shared_expert_gate",) if shared else ())),
        ScaleGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",), "mlp.experts.{e}.down_proj",
                   Fold.LINEAR),
    ) + ((ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",),
                     "mlp.shared_expert.down_proj", Fold.LINEAR),) if shared else ())
    downs = ("mlp.experts.{e}.down_proj",) + (("mlp.shared_expert.down_proj",) if shared else ())
    return Architecture(
        family=family, model_types=(model_type,), hf_classes=(cls,),
        blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
        lm_head_path="lm_head",
        sequential=(ATTN, ("self_attn.o_proj",), expert_in, downs), scale_groups=groups, no_clip=LLAMA_NO_CLIP,
        qkv_bias=qkv_bias, qk_norm=qk_norm, layer_types=layer_types,
        experts=Experts(renormalize="norm_topk_prob",
                        shared_expert="mlp.shared_expert" if shared else "",
                        shared_gate="mlp.shared_expert_gate" if shared else ""),
        keep_float=("mlp.shared_expert_gate",),
        gguf=GGUFSpec(arch, hparams=functools.partial(_hparams, renormalizes=renormalizes),
                     config_from=functools.partial(_config, renormalizes=renormalizes)),
    )


ARCHITECTURES = (
    _moe("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "QWEN2MOE", shared=True, qkv_bias=True, qk_norm=False,
         renormalizes=False, layer_types="layer_types"),   # sliding-window layers with use_sliding_window
    _moe("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "QWEN3MOE", shared=False, qkv_bias=False, qk_norm=True,
         renormalizes=True),
)
