"""Architecture adapters: where a causal LM keeps its decoder blocks, norms and Linear layers.

Methods and the calibration pipeline ask the adapter instead of assuming one architecture's attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import UnsupportedArchitecture


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module):
    """The [out, in] weight of a Linear-like module (Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = linear_weight(module)
    return w.shape[1], w.shape[0]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op producing it (AWQ folds input scales into `prev`)."""

    prev: str            # module name inside the block (a norm or a Linear), "" when scales cannot be folded
    linears: tuple[str, ...]
    inspect: str         # module whose input the linears share (for capturing activations)


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths of one architecture family."""

    family: str
    blocks_path: str
    embed_path: str
    final_norm_path: str
    lm_head_path: str
    sequential: tuple[tuple[str, ...], ...]   # true-sequential order of Linears inside a block
    scale_groups: tuple[ScaleGroup, ...]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"


LLAMA = ArchAdapter(
    family="llama",
    blocks_path="model.layers",
    embed_path="model.embed_tokens",
    final_norm_path="model.norm",
    lm_head_path="lm_head",
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

GPT2 = ArchAdapter(
    family="gpt2",
    blocks_path="transformer.h",
    embed_path="transformer.wte",
    final_norm_path="transformer.ln_f",
    lm_head_path="lm_head",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    scale_groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), "attn"),
        ScaleGroup("ln_2", ("mlp.c_fc",), "mlp"),
        ScaleGroup("", ("mlp.c_proj",), "mlp.c_proj"),  # GELU sits before c_proj: scales cannot be folded
    ),
)

# model_type (config.json) -> adapter. Llama-family models share one layout.
ADAPTERS: dict[str, ArchAdapter] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "smollm3": LLAMA, "gpt2": GPT2,
}


def adapter_for(model_or_type) -> ArchAdapter:
    """The adapter for a model (or a config.json model_type), or a clear error naming the supported ones."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; lowbit supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
