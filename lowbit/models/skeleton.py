"""A model for lowbit's engine only, built from the family's Architecture and a config without transformers'
modeling code.

Why: importing a transformers model class brings in most of transformers and what it imports (torch._dynamo
through masking_utils, accelerate through activations, sympy through torch.distributed.tensor): about 100 MB
resident and 1,300 modules in every process that only generates text. The engine (engine/runner.py, RotaryDecoder)
never calls a model's forward: it reads the modules at the paths its Architecture names (embedding, norms, the
Linears of each block, the final norm and head) and computes the rotary tables once. `EngineSkeleton` holds exactly
those modules under the same names and shapes as transformers' model (so loaders fill it with the same state dict
keys, and check a file's tensors against it the same way), plus a rotary module computing transformers' tables.

Which families: pre-norm rotary decoders with separate q, k, v and gate, up projections, RMS norms, full-width
rotary and no experts (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3); `skeleton_refusal` says why any other cannot
have one, and loaders then build transformers' model as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.rope_scaling import default_inv_freq
from lowbit.models.arch.base import (
    ACTIVATIONS, LENGTH_DEPENDENT_ROPE, Architecture, NormKind, rope_parameter_sets, rope_parameters_by_type,
    rotary_path,
)

# what the Linears of Architecture.stages compute, stage by stage
ROLES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def skeleton_refusal(arch: Architecture, config: Any) -> str | None:
    """Why `arch` / `config` cannot run as an EngineSkeleton (None when it can)."""
    if arch.position != "rope":
        return f"{arch.position} positions"
    if arch.norm not in (NormKind.RMS, NormKind.RMS_PLUS_ONE):
        return f"{arch.norm.value} norms"
    if arch.experts is not None:
        return "experts"
    if arch.fused or arch.parallel_attn_mlp or not arch.gated_mlp:
        return "fused projections or a parallel / ungated block"
    if [len(stage) for stage in arch.stages] != [len(role) for role in ROLES]:
        return "a block layout other than q, k, v / o / gate, up / down"
    if ACTIVATIONS.get(getattr(config, arch.activation_config, None)) is None:
        return f"MLP activation {getattr(config, arch.activation_config, None)!r}"
    for params in rope_parameter_sets(config):
        if params.get("rope_type", "default") in LENGTH_DEPENDENT_ROPE:
            return f"rope type {params.get('rope_type')}"
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            return "partial rotary embedding"
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embedding"
    return None


class SkeletonRMSNorm(nn.Module):
    """An RMSNorm's weight and epsilon, which the engine reads (it computes the norm itself, with Gemma's 1 + w)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _meta(size)
        self.eps = eps


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding: rows times sqrt(hidden), as transformers' *TextScaledWordEmbedding computes it (a float32
    scalar cast to the weight's dtype). lowbit's QuantEmbedding reads `embed_scale` when it replaces this module."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float):
        super().__init__(num_embeddings, embedding_dim, _weight=_meta(num_embeddings, embedding_dim))
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class RotaryTables(nn.Module):
    """cos and sin of every position, computed as transformers' rotary modules compute them: inverse frequencies
    from the config's rope parameters (rope_type default, or transformers' own ROPE_INIT_FUNCTIONS for linear,
    llama3, yarn ...), per layer type when the config nests its rope parameters by layer type (Gemma 3)."""

    def __init__(self, config: Any):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.tables: dict[str | None, tuple[torch.Tensor, float]] = {}
        by_type = rope_parameters_by_type(config)
        if not by_type:
            raise LowbitError(f"{config.model_type} config has no rope_parameters; the model cannot be run")
        for name, params in by_type.items():
            rope_type = params.get("rope_type", "default")
            if rope_type == "default":
                inv_freq, scaling = default_inv_freq(float(params["rope_theta"]), head_dim), 1.0
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                if rope_type not in ROPE_INIT_FUNCTIONS:
                    raise LowbitError(f"rope type {rope_type!r} is not one transformers knows; fix the config")
                extra = {"layer_type": name} if name is not None else {}
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **extra)
            self.tables[name] = (inv_freq.float(), float(scaling))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin(x, position_ids, None)

    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.tables[layer_type]
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)


class RotaryTablesPerType(RotaryTables):
    """Rotary tables per layer type: the engine asks for each type's (it reads `layer_type` in the signature, as
    in transformers' Gemma 3 rotary module)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos_sin(x, position_ids, layer_type)


class EngineSkeleton(nn.Module):
    """The modules lowbit's engine runs, at transformers' names (module paths from the Architecture), with empty
    (meta) parameters for a loader to fill; `activation` is the MLP's, read from the config as the family's
    transformers model reads it. It has no forward: transformers' generate, training and evaluation need the real
    model class (load without engine_only)."""

    def __init__(self, arch: Architecture, config: Any, has_bias: Callable[[str], bool] = lambda path: False):
        """`has_bias(module path)`: whether the weights to be loaded hold that block Linear's bias. Families that
        always have one (Qwen2's q, k, v: Architecture.qkv_bias) get it regardless, so a file without it fails the
        tensor check; others take what the file holds, as llama.cpp does (transformers decides per family and
        config: Llama's attention_bias, Mistral never)."""
        super().__init__()
        refusal = skeleton_refusal(arch, config)
        if refusal is not None:
            raise LowbitError(f"lowbit's engine-only model cannot hold a {config.model_type} model with {refusal}")
        self.config = config
        self.arch = arch
        self.activation = ACTIVATIONS[getattr(config, arch.activation_config)]
        hidden, vocab = config.hidden_size, config.vocab_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        eps = float(config.rms_norm_eps)
        shapes = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden),
                  "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim),
                  "gate": (config.intermediate_size, hidden), "up": (config.intermediate_size, hidden),
                  "down": (hidden, config.intermediate_size)}
        embed = (ScaledEmbedding(vocab, hidden, hidden ** 0.5) if arch.embed_scale
                 else nn.Embedding(vocab, hidden, _weight=_meta(vocab, hidden)))
        self._put(arch.embed_path, embed)
        self._put(arch.final_norm_path, SkeletonRMSNorm(hidden, eps))
        self._put(arch.lm_head_path, _empty_linear(hidden, vocab, bias=False))
        per_type = None not in rope_parameters_by_type(config)
        self._put(rotary_path(arch), (RotaryTablesPerType if per_type else RotaryTables)(config))
        layout = arch.layout
        blocks = nn.ModuleList()
        self._put(arch.blocks_path, blocks)
        for index in range(config.num_hidden_layers):
            block = nn.Module()
            blocks.append(block)
            prefix = f"{arch.blocks_path}.{index}."
            for stage, roles in zip(arch.stages, ROLES):
                for path, role in zip(stage, roles):
                    out_features, in_features = shapes[role]
                    bias = (role in ("q", "k", "v") and arch.qkv_bias) or has_bias(f"{prefix}{path}")
                    _put(block, path, _empty_linear(in_features, out_features, bias))
            for path in (layout.input_norm, layout.mlp_norm, layout.attn_out_norm, layout.mlp_out_norm):
                if path:
                    _put(block, path, SkeletonRMSNorm(hidden, eps))
            if arch.qk_norm:
                _put(block, layout.q_norm, SkeletonRMSNorm(head_dim, eps))
                _put(block, layout.k_norm, SkeletonRMSNorm(head_dim, eps))

    def _put(self, path: str, module: nn.Module) -> None:
        _put(self, path, module)

    def get_output_embeddings(self) -> nn.Module:
        return self.get_submodule(self.arch.lm_head_path)

    def tie_weights(self) -> None:
        """The head reads the embedding's weight (tie_word_embeddings)."""
        self.get_output_embeddings().weight = self.get_submodule(self.arch.embed_path).weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise LowbitError("this model was loaded for lowbit's engine only (generate, serve, bench); load it without "
                          "engine_only to run transformers' forward")


def _meta(*shape: int) -> nn.Parameter:
    """A parameter with a shape and no storage, for a loader to fill (assign=True)."""
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _empty_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An nn.Linear with meta parameters, its constructor skipped: initialising meta tensors (nn.Linear(...,
    device="meta")) goes through torch's Python decompositions, which import torch._dynamo and sympy (about 50 MB
    resident), the very import this module exists to avoid; initialising real ones would draw from torch's global
    random generator."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = _meta(out_features, in_features)
    if bias:
        linear.bias = _meta(out_features)
    else:
        linear.register_parameter("bias", None)
    return linear


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set `module` at the dotted `path` under `root`, creating empty parent modules on the way."""
    *parents, name = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(name, module)


def refuse_engine_only(model: nn.Module, action: str) -> None:
    """Writers, adapters and training read a model's weights row by row or run its forward; an engine-only model has
    no forward and keeps Llama's q/k rows in llama.cpp's order (QuantLinear.output_order), so it is refused by name
    rather than written with those rows out of order."""
    if isinstance(model, EngineSkeleton):
        raise LowbitError(f"cannot {action} a model loaded engine-only (for generate, serve and bench): load it with "
                          "load_model(path, keep_quantized=True), without engine_only")
