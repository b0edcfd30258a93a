"""Mixtral: the Llama attention with a top-2 mixture of SwiGLU experts; llama.cpp calls it "llama" with
stacked expert tensors (ffn_gate_exps ...)."""
from lowbit.models.arch.base import (
    Architecture, Experts, Fold, GGUFSpec, ScaleGroup, llama_like_config, llama_like_hparams, moe_config,
    moe_hparams,
)
from lowbit.models.arch.llama import ATTN, LLAMA_NO_CLIP

EXPERT_IN = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")
MOE_SEQUENTIAL = (ATTN, ("self_attn.o_proj",), EXPERT_IN, ("mlp.experts.{e}.down_proj",))
MOE_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ATTN, "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", Fold.LINEAR),
    # the router reads the same normalised input: its columns take the scale too (it stays in float)
    ScaleGroup("post_attention_layernorm", EXPERT_IN, "mlp", companions=("mlp.gate",)),
    ScaleGroup("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",), "mlp.experts.{e}.down_proj", Fold.LINEAR),
)


def _hparams(config):
    return {**llama_like_hparams(config), **moe_hparams(config)}


def _config(meta):
    return {**llama_like_config(meta), **moe_config(meta, "num_local_experts")}


ARCHITECTURE = Architecture(
    family="mixtral", model_types=("mixtral",), hf_classes=("MixtralForCausalLM",),
    blocks_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=MOE_SEQUENTIAL, scale_groups=MOE_SCALE_GROUPS, no_clip=LLAMA_NO_CLIP,
    # transformers' own conversion (conversion_mapping "mixtral"): Mixtral checkpoints name the MoE
    # block_sparse_moe and the experts' gate/down/up projections w1/w2/w3
    experts=Experts(disk_renames=(("block_sparse_moe.", "mlp."),), disk_projections=("w1", "w3", "w2")),
    gguf=GGUFSpec("LLAMA", permute_qk=True, hparams=_hparams, config_from=_config),
)
