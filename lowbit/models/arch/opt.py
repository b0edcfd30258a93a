"""OPT (the GPTQ paper's models): learned positions, LayerNorms with bias, ReLU MLP (fc1, fc2), biases
everywhere. ReLU commutes with positive scales, so AWQ folds fc2's scales into fc1's rows.
llama.cpp has no OPT architecture: no GGUF."""
from lowbit.models.arch.base import Architecture, BlockLayout, Fold, NormKind, ScaleGroup

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

ARCHITECTURE = Architecture(
    family="opt", model_types=("opt",), hf_classes=("OPTForCausalLM",),
    blocks_path="model.decoder.layers", embed_path="model.decoder.embed_tokens",
    final_norm_path="model.decoder.final_layer_norm", lm_head_path="lm_head",
    sequential=(ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    scale_groups=(
        ScaleGroup("self_attn_layer_norm", ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", Fold.LINEAR),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("fc1", ("fc2",), "fc2", Fold.LINEAR),
    ),
    norm=NormKind.LAYER, activation="relu", gated_mlp=False, position="learned",
    position_embed_path="model.decoder.embed_positions", position_offset=2,
    layout=BlockLayout(input_norm="self_attn_layer_norm", mlp_norm="final_layer_norm"),
    qkv_bias=True, out_bias=True, mlp_bias=True, no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    gguf=None,
)
