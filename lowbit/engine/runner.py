"""lowbit's inference engine: batched prefill, decode over a preallocated KV cache, sampling, stop tokens.

The engine runs a loaded Hugging Face model whose Linear layers may be QuantLinear modules. For pre-norm rotary
decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 1/2/3, Phi-3, the mixtures of experts Mixtral, Qwen2-MoE,
Qwen3-MoE, and the LayerNorm families GPT-NeoX, GPT-2, OPT, BLOOM, Falcon: whatever `decoder_blocker` accepts from
the family's Architecture) it runs its own decoder loop over the model's modules: q/k/v and gate/up projections
fused into one matmul each, rotary tables computed once, a static cache of shape
[layers, slots, kv_heads, context, head_dim] written in place, and attention over only the filled prefix (or the
layer's window). Single tokens decode through the compiled step (engine/compiled_step.py). One cache slot per
sequence lets sequences at different positions decode together in one step (continuous batching). Other
architectures run through transformers' own forward, one sequence at a time.
"""
from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.engine.generate import SamplingParams, sample_next, sample_rows
from lowbit.engine.compiled_step import NativeDecodeStep
from lowbit.models.arch.base import ACTIVATIONS, LENGTH_DEPENDENT_ROPE, rope_parameter_sets, rotary_path
from lowbit.engine.threads import ThreadTuner
from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.activations import Activations
from lowbit.runtime.cpu import gemm_dtype
from lowbit.runtime.fast_kernels import PREFILL_ROWS
from lowbit.runtime.memory import release_freed_heap

COMPILED_BATCH_ROWS = 128   # decode batches below this many rows run through the compiled step (see RotaryDecoder)
from lowbit.runtime.qlinear import QuantLinear, rows_reordered

# Prompt tokens (one prompt, or several prefilled together) up to which the compiled step runs them, reading each
# weight once per 16 rows; longer ones run through bf16 GEMMs, which first dequantize every weight: a fixed cost
# that depends on the layout, so the crossover does too. Measured at 1 thread (CPU time, prompts of 16-192 tokens,
# bench/prefill_crossover.py, results prefill_crossover*_2026-12-03.json): GGUF blocks with int8 activations cross
# at ~64 tokens on the vector kernels (SmolLM2 Q4_1, Qwen2.5-0.5B Q4_K_M) and, on AMX tiles, at ~90 (SmolLM2 Q4_1),
# ~140 (Qwen2.5-0.5B Q4_K_M, mostly Q5_0 / Q8_0) and ~130-190 (Llama-3.2-1B Q4_K_M shape); lowbit's own codes with
# float32 activations at ~120 (Qwen2.5-0.5B RTN-4); float weights, which a GEMM reads as they are, at ~16-24
# (SmolLM2 float32).
NATIVE_PREFILL_TOKENS = {"int8 tiles": 112, "int8 blocks": 64, "codes": 112, "float": 16}
DEFAULT_CONTEXT = 2048


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads for torch (None or 0: keep torch's default); returns the count in use."""
    if threads is not None and threads < 0:
        raise LowbitError(f"--threads must be >= 1 (got {threads})")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass
class Sequence:
    """One request being generated: its tokens, its cache slot and position, its random state."""

    prompt_ids: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    position: int = 0          # number of tokens already in the cache
    finish_reason: str | None = None   # "stop", "length", or "cancelled" once finished
    generator: torch.Generator | None = None
    stop_on_eos: bool = True
    prefill_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits, with the same sampler as `lowbit generate`."""
    return int(sample_next(logits[None], params, generator)[0])


# -- linear fusion -------------------------------------------------------------------------------------------

class _DenseLinear(nn.Module):
    """A plain float Linear built from several (their weights stacked along the output dimension)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _stacked_bias(modules: SequenceType[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach().to(dtype) if b is not None else torch.zeros(m.out_features, dtype=dtype)
                      for b, m in zip(biases, modules)])


def fuse_linears(modules: SequenceType[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of Linears that read the same input, or None if their
    weights cannot be stacked (different schemes, act-order permutations, scheme-specific extra tensors).
    QuantLinears with output orders (stored rows in another order) stack as stored, their orders composed into
    the fused module's."""
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules])
        return _DenseLinear(weight, _stacked_bias(modules, weight.dtype))
    if not all(isinstance(m, QuantLinear) for m in modules):
        return None
    weights: list[QuantizedWeight] = [m.qweight for m in modules]
    first = weights[0]
    # GGUF block schemes keep their file bytes in `extra` only for writing; kernels compute from codes and
    # statistics, so a fused copy (compute only) may drop them. Other schemes' extras may carry numbers.
    stackable = all(
        qw.scheme == first.scheme and qw.group_size == first.group_size and qw.g_idx is None
        and (not qw.extra or qw.scheme.kind == "ggml")
        and qw.in_features == first.in_features and (qw.zeros is None) == (first.zeros is None)
        and qw.scales.shape[1] == first.scales.shape[1] for qw in weights)
    if not stackable:
        return None
    fused = QuantizedWeight(
        scheme=first.scheme, shape=(sum(qw.out_features for qw in weights), first.in_features),
        codes=torch.cat([qw.codes for qw in weights]), scales=torch.cat([qw.scales for qw in weights]),
        zeros=None if first.zeros is None else torch.cat([qw.zeros for qw in weights]),
        group_size=first.group_size)
    return QuantLinear(fused, _stacked_bias(modules, torch.float32), kernel=modules[0].kernel_preference,
                       output_order=_stacked_output_order(modules))


def _stacked_output_order(modules: SequenceType[QuantLinear]) -> torch.Tensor | None:
    """The output order of QuantLinears' weights stacked as stored: each one's order (or none) shifted to its
    rows; None when none has an order."""
    if all(m.output_order is None for m in modules):
        return None
    starts = torch.tensor([0] + [m.out_features for m in modules]).cumsum(0)
    return torch.cat([start + (m.output_order if m.output_order is not None else torch.arange(m.out_features))
                      for start, m in zip(starts.tolist(), modules)])


def _fused_or_separate(modules: SequenceType[nn.Module], fuse: bool
                       ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]:
    """A callable returning the concatenated outputs of `modules` (one matmul when they can be fused), and the
    modules it runs (the fused one, or the originals)."""
    if len(modules) == 1:      # already one weight (Phi-3's qkv_proj, gate_up_proj)
        return modules[0], list(modules)
    fused = fuse_linears(modules) if fuse else None
    if fused is not None:
        return fused, [fused]
    return (lambda x: torch.cat([m(x) for m in modules], dim=-1)), list(modules)


# -- the rotary decoder ---------------------------------------------------------------------------------------

def decoder_blocker(model: nn.Module) -> str | None:
    """Why lowbit's own decoder (static cache, compiled step) cannot run `model`, from its architecture's
    declared features and its config; None when it can."""
    from lowbit.models.arch import architecture_for
    from lowbit.models.arch.base import NormKind

    config = model.config
    try:
        arch = architecture_for(model)
    except LowbitError:
        return f"architecture {getattr(config, 'model_type', None)!r} not in lowbit's registry"
    if arch.experts is not None:
        dense = [i for i, block in enumerate(arch.blocks(model)) if not _has(block, arch.experts.path)]
        if dense:
            return f"dense MLP layers {dense[:4]} among the expert layers"
    learned = arch.position == "learned" and bool(arch.position_embed_path)
    alibi = arch.position == "alibi" and _alibi_builder(model, arch) is not None
    if arch.position not in ("rope", "partial_rope") and not learned and not alibi:
        return f"{arch.position} positions"
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        return "residuals from the normalised input (apply_residual_connection_post_layernorm)"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "attention scaled by the inverse layer index"
    if getattr(config, "scale_attn_weights", True) is False:      # GPT-2: scores not divided by sqrt(head_dim)
        return "unscaled attention scores (scale_attn_weights=False)"
    if getattr(config, "do_layer_norm_before", True) is False:
        return "norms after attention and MLP (do_layer_norm_before=False)"
    if getattr(config, "layer_norm_elementwise_affine", True) is False:
        return "LayerNorms without weights"
    if getattr(config, "word_embed_proj_dim", None) not in (None, config.hidden_size):
        return "embedding projections (project_in / project_out)"
    if len(arch.stages) != 4 or any(arch.fused.get(path[0], ()) not in ((), expected)
                                    for path, expected in zip(arch.stages[::2], (("q", "k", "v"),
                                                                                          ("gate", "up")))):
        return "block layout other than attention then MLP"
    fused_qkv = [path for path in arch.stages[0] if arch.fused.get(path) == ("q", "k", "v")]
    qkv_layout = arch.gguf.qkv_layout if arch.gguf is not None else ""
    if fused_qkv and qkv_layout not in ("", "heads_interleaved", "kv_groups"):
        return f"fused q|k|v rows in {qkv_layout} order"
    refused = arch.engine_refuses(config) if arch.engine_refuses is not None else None
    if refused:
        return refused
    if arch.norm is NormKind.LAYER and arch.sandwich_norm:
        return "sandwich layer norms"
    if not learned and not alibi and not _has(model, rotary_path(arch)):
        return f"no rotary module at {rotary_path(arch)}"
    if _activation_of(model, arch) is None:
        return f"MLP activation {getattr(config, arch.activation_config, None)!r}"
    varying = sorted({p.get("rope_type", "default") for p in rope_parameter_sets(config)} & set(LENGTH_DEPENDENT_ROPE))
    if varying:
        return f"rope type {varying[0]} (tables change with the sequence length)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if not all(getattr(config, "no_rope_layers", None) or [1]):
        return "layers without rotary embedding (NoPE)"
    return None


def _alibi_builder(model: nn.Module, arch: Any) -> Any:
    """transformers' own ALiBi builder (BLOOM's build_alibi_tensor, on the module holding the blocks), or None."""
    holder = model.get_submodule(arch.blocks_path.rpartition(".")[0])
    return getattr(holder, "build_alibi_tensor", None)


def alibi_slopes(model: nn.Module, arch: Any, heads: int) -> torch.Tensor:
    """Each head's ALiBi slope, read from transformers' builder: the bias of key position 1 (it adds slope * key
    position to the scores; softmax is blind to the per-query shift)."""
    bias = _alibi_builder(model, arch)(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)
    return bias.reshape(heads, 2)[:, 1].contiguous()


def _activation_of(model: nn.Module, arch: Any) -> str | None:
    """What the MLP computes on the gate ("silu", "gelu_tanh", "gelu"), read from the module the model runs
    (Gemma 1 reads config.hidden_act, Gemma 2/3 config.hidden_activation), or None if it is none of those. An
    engine-only model (models/skeleton.py) has no activation module: it read its activation from the config."""
    from lowbit.models.skeleton import EngineSkeleton

    if isinstance(model, EngineSkeleton):
        return model.activation
    from transformers.activations import ACT2FN

    block = arch.blocks(model)[0]
    if arch.experts is not None:      # transformers' fused experts module, or lowbit's per-expert MLPs
        mlp = block.get_submodule(arch.experts.path)
        mlp = mlp[0] if isinstance(mlp, nn.ModuleList) and len(mlp) else mlp
    else:
        mlp = block.get_submodule(arch.stages[3][0].rpartition(".")[0])
    act = next((getattr(mlp, a) for a in ("act_fn", "activation_fn", "act", "gelu_impl") if hasattr(mlp, a)), None)
    if arch.activation_class and type(act).__name__ == arch.activation_class:     # BLOOM's BloomGelu
        return arch.activation
    config = model.config
    for name in (getattr(config, "hidden_activation", None), getattr(config, "hidden_act", None),
                 getattr(config, "activation_function", None), arch.activation):     # GPT-2: activation_function
        if name in ACT2FN and act is not None and type(ACT2FN[name]) is type(act):
            return ACTIVATIONS.get(name)
    return None


def layer_windows(config: Any) -> list[int]:
    """Each layer's attention window (0: the whole context): config.layer_types' sliding-attention layers
    (Gemma 2/3, Qwen2), or every layer when the config has a window and no layer types (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else 0 for t in types]
    return [window] * config.num_hidden_layers


@dataclass
class _Norm:
    """An RMSNorm as the family applies it: `weight` is the factor (Gemma's 1 + w, added once in float32); or, with
    `bias` (GPT-NeoX), a LayerNorm."""

    weight: torch.Tensor
    eps: float
    bias: torch.Tensor | None = None
    layer: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _norm(module: nn.Module | None, plus_one: bool, layer: bool = False) -> _Norm | None:
    if module is None:
        return None
    eps = getattr(module, "variance_epsilon", None)
    weight = module.weight.detach()
    bias = getattr(module, "bias", None) if layer else None
    return _Norm((1.0 + weight.float()) if plus_one else weight, float(eps if eps is not None else module.eps),
                 None if bias is None else bias.detach(), layer)


def _rows_reordered(module: nn.Module, order: torch.Tensor) -> nn.Module | None:
    """A copy of a Linear (float or quantized) whose output rows are `order` of the original's (a fused
    query_key_value interleaved per head -> q|k|v), or None for a weight whose extra tensors it cannot reorder.
    A QuantLinear's own output order is composed in: the copy's rows are stored in its output order."""
    from lowbit.models.arch.base import linear_weight

    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()[order]
    if not isinstance(module, QuantLinear):
        return _DenseLinear(linear_weight(module).detach()[order].contiguous(), bias)
    stored = order if module.output_order is None else module.output_order[order]
    reordered = rows_reordered(module.qweight, stored)
    if reordered is None:
        return None
    return QuantLinear(reordered, None if bias is None else bias.float(), kernel=module.kernel_preference)


@dataclass
class _MoE:
    """An expert layer: `module` is the block's MLP, transformers' own routing over the experts (what the torch
    decoder runs); the rest is what the compiled step reads, per the family's Architecture.experts."""

    module: nn.Module
    router: nn.Module
    shared_gate: nn.Module | None
    experts: list[list[nn.Module]] | None   # gate, up, down of each routed expert, then the shared expert's;
                                            # None while transformers' fused 3-D expert tensors hold them
    n_experts: int
    top_k: int
    renormalize: bool


def _moe_layer(block: nn.Module, arch: Any, config: Any) -> _MoE:
    from lowbit.models.arch.base import UnfusedExperts

    spec = arch.experts
    experts = block.get_submodule(spec.path)
    module = lambda path: block.get_submodule(path) if path else None  # noqa: E731
    per_expert = None
    if isinstance(experts, UnfusedExperts):
        shared = [module(spec.shared_expert)] if spec.shared_expert else []
        per_expert = [[getattr(expert, p) for p in spec.projections] for expert in [*experts, *shared]]
    n_experts = len(experts) if isinstance(experts, nn.ModuleList) else int(experts.gate_up_proj.shape[0])
    top_k = int(getattr(config, spec.top_k))
    if not 0 < top_k <= n_experts:
        raise LowbitError(f"config {spec.top_k}={top_k} must be between 1 and the {n_experts} experts; fix the "
                          "model's config.json")
    return _MoE(module(spec.path.rpartition(".")[0]), module(spec.router), module(spec.shared_gate), per_expert,
                n_experts, top_k, spec.renormalizes(config))


@dataclass
class _Layer:
    input_norm: _Norm
    moe: _MoE | None                  # an expert layer: its MLP instead of gate_up and down
    qkv: Callable[[torch.Tensor], torch.Tensor]
    q_norm: _Norm | None
    k_norm: _Norm | None
    o_proj: nn.Module
    attn_out_norm: _Norm | None      # sandwich norms (Gemma 2/3): of the attention / MLP output, before the add
    mlp_norm: _Norm
    gate_up: Callable[[torch.Tensor], torch.Tensor] | None
    down: nn.Module | None
    mlp_out_norm: _Norm | None
    qkv_parts: list[nn.Module]        # the modules `qkv` runs, in output order
    gate_up_parts: list[nn.Module]
    rope: int                         # index of this layer's rotary tables in the decoder's cos / sin
    window: int                       # attends to the last `window` positions; 0: all


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


class RotaryDecoder:
    """Runs a pre-norm decoder (the families `decoder_blocker` accepts: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3,
    Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-NeoX, GPT-2, OPT, BLOOM, Falcon) with lowbit's static cache, reading the
    block layout from the model's Architecture (no HF forward on the hot path, but for the expert layers' routing
    in torch)."""

    def __init__(self, model: nn.Module, slots: int, context: int, kv_dtype: torch.dtype, fuse: bool = True,
                 prefill_attention_dtype: torch.dtype = torch.float32, native: bool = True,
                 activations: Activations = Activations.AUTO):
        """`native`: decode single tokens with the compiled step (engine/compiled_step.py) when it can run the model;
        `activations`: its matmuls' activation arithmetic (runtime/activations.py)."""
        from lowbit.models.arch import architecture_for
        from lowbit.models.arch.base import NormKind

        blocker = decoder_blocker(model)
        if blocker is not None:
            raise LowbitError(f"lowbit's decoder cannot run this model: {blocker}")
        config = model.config
        self.arch = arch = architecture_for(model)
        self.plus_one = arch.norm is NormKind.RMS_PLUS_ONE
        self.layer_norm = arch.norm is NormKind.LAYER          # LayerNorms with bias (GPT-NeoX)
        self.gated = arch.gated_mlp                            # act(gate) * up, or act(up) alone
        # x + attn(norm(x)) + mlp(norm2(x)): both read the block's input (GPT-NeoX, unless its config says not)
        self.parallel = arch.parallel_attn_mlp and bool(getattr(config, arch.parallel_switch, True)
                                                        if arch.parallel_switch else True)
        self.prefill_attention_dtype = prefill_attention_dtype
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = (arch.kv_heads_of(config) if arch.kv_heads_of is not None
                         else getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.embed = model.get_submodule(arch.embed_path)
        self.final_norm = _norm(model.get_submodule(arch.final_norm_path), self.plus_one, self.layer_norm)
        self.lm_head = model.get_submodule(arch.lm_head_path)
        self.activation = _activation_of(model, arch)
        self.attn_scale = float(getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None) if arch.logit_softcap else None
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        from lowbit.models.arch.base import in_out_features

        # GPT-2's config has no intermediate_size (n_inner, or 4 x hidden): the MLP output's input width says
        self.intermediate = (getattr(config, "intermediate_size", None)
                             or in_out_features(arch.blocks(model)[0].get_submodule(arch.stages[3][0]))[0])
        self.context = context
        self.windows = layer_windows(config)
        # Rotary tables for every position, computed once with the model's own rotary module (rope scaling
        # variants, partial rotary and per-layer-type bases included), exactly as transformers computes them
        # per step: [table][context, rotary dims].
        # Learned positions (GPT-2): their embedding is added to the token's, and no table rotates q and k.
        self.embed_norm = _norm(model.get_submodule(arch.embed_norm_path), False, self.layer_norm) \
            if arch.embed_norm_path else None
        # ALiBi (BLOOM): slope[head] * key position added to the attention scores, no rotary tables
        self.alibi = alibi_slopes(model, arch, self.heads) if arch.position == "alibi" else None
        self.position_embed = None
        if arch.position == "learned":
            table, offset = model.get_submodule(arch.position_embed_path).weight.detach(), arch.position_offset
            self.position_embed = lambda positions: F.embedding(positions + offset, table)
        rotary = (model.get_submodule(rotary_path(arch)) if arch.position in ("rope", "partial_rope")
                  else lambda x, positions: (torch.zeros(1, context, 0), torch.zeros(1, context, 0)))
        positions = torch.arange(context)[None]
        types = list(getattr(config, "layer_types", None) or [])
        per_type = types and "layer_type" in inspect.signature(getattr(rotary, "forward", rotary)).parameters
        table_names = sorted(set(types)) if per_type else [None]
        self.cos, self.sin = [], []
        for name in table_names:
            extra = {"layer_type": name} if name is not None else {}
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions, **extra)
            self.cos.append(cos[0].float().contiguous())
            self.sin.append(sin[0].float().contiguous())
        self.rope_dim = self.cos[0].shape[-1]
        self.layer_rope = [table_names.index(t) for t in types] if per_type else [0] * config.num_hidden_layers
        # The compiled step reads q/k/v and gate/up as parts of one matmul, so it needs no fused copies of their
        # codes: layers are built unfused for it, and fused only if it cannot run the model.
        self.layers = self._layers(model, fuse and not native)
        shape = (len(self.layers), slots, self.kv_heads, context, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype)
        self.native, reason = (NativeDecodeStep.build(self, activations) if native
                               else (None, "compiled step switched off"))
        self.path = "compiled step" if self.native is not None else f"torch decoder ({reason})"
        self.arithmetic = self.native.arithmetic if self.native is not None else "float32 activations (torch)"
        # Rows from which a decode step leaves the compiled step for the torch decoder's GEMMs. The compiled step
        # reuses each weight row for 16 rows of the batch; the GEMMs dequantize every weight each step. Measured on
        # SmolLM2, 2 threads, one step: RTN-4 g128 (float32 activations) 45 / 87 / 180 ms at 16 / 32 / 64 rows
        # against 253 / 258 / 271 ms for the GEMMs; Q4_1 blocks (int8 activations) 105 ms at 32 rows against 94.
        # And `lowbit serve` with 32 streaming clients got 200 tok/s through the compiled step against 88 through
        # the GEMMs, whose ~1,500 torch calls a step contend for the GIL with the server's threads
        # (bench/bench_engine.py). So the step keeps decode batches below COMPILED_BATCH_ROWS. With AMX tiles for GGUF
        # blocks (2026-12-03), 2 threads, position 40: Llama-3.2-1B Q4_K_M 400 / 769 ms at 64 / 128 rows against
        # 804 / 8,302 for the GEMMs; Qwen2.5-0.5B RTN-4 (float32, no tiles) 538 / 1,072 against 913 / 1,068: the
        # step is as fast or faster up to 128 rows, hence 128 (it was 64).
        self.compiled_batch_rows = COMPILED_BATCH_ROWS
        # (no compiled step: 0, every prompt runs through GEMMs, and the engine trims the heap after each)
        self.native_prefill_tokens = 0 if self.native is None else NATIVE_PREFILL_TOKENS[self.native.prefill_layout]
        if self.native is None and native and fuse:
            self.layers = self._layers(model, fuse=True)

    def _layers(self, model: nn.Module, fuse: bool) -> list[_Layer]:
        arch = self.arch
        (attn_in, attn_out, mlp_in, mlp_out), layout = arch.stages, arch.layout
        layers = []
        for index, block in enumerate(arch.blocks(model)):
            module = lambda path: block.get_submodule(path) if path and _has(block, path) else None  # noqa: E731
            qkv, qkv_parts = self._qkv(block, attn_in, fuse)
            moe = _moe_layer(block, arch, model.config) if arch.experts is not None else None
            if moe is None:
                gate_up, gate_up_parts = _fused_or_separate([block.get_submodule(p) for p in mlp_in], fuse)
                down = block.get_submodule(mlp_out[0])
            else:
                gate_up, gate_up_parts, down = None, [], None
            norm = lambda path: _norm(module(path), self.plus_one, self.layer_norm)  # noqa: E731
            layers.append(_Layer(
                input_norm=norm(layout.input_norm), moe=moe, qkv=qkv,
                q_norm=norm(layout.q_norm) if arch.qk_norm else None,
                k_norm=norm(layout.k_norm) if arch.qk_norm else None,
                o_proj=block.get_submodule(attn_out[0]), attn_out_norm=norm(layout.attn_out_norm),
                mlp_norm=norm(layout.mlp_norm), gate_up=gate_up, down=down,
                mlp_out_norm=norm(layout.mlp_out_norm), qkv_parts=qkv_parts, gate_up_parts=gate_up_parts,
                rope=self.layer_rope[index], window=self.windows[index]))
        return layers

    def _qkv(self, block: nn.Module, paths: tuple[str, ...], fuse: bool
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]:
        """The block's q|k|v (one matmul where possible) in q, k, v row order: a fused query_key_value interleaved
        per head (GPT-NeoX) is read through a row-reordered copy; if the weight cannot be reordered, its outputs are
        gathered in torch (and the compiled step, given no parts, is not used)."""
        from lowbit.models.arch.base import qkv_row_order

        modules = [block.get_submodule(p) for p in paths]
        layout = self.arch.gguf.qkv_layout if self.arch.gguf is not None else ""
        if len(modules) > 1 or not layout:
            return _fused_or_separate(modules, fuse)
        order = qkv_row_order(layout, self.heads, self.kv_heads, self.head_dim)
        reordered = _rows_reordered(modules[0], order)
        if reordered is None:
            return (lambda x: modules[0](x)[..., order]), []
        return reordered, [reordered]

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] for one token per row: row b's token `tokens[b]` at `positions[b]` of slot `slots[b]`.

        Fewer than `compiled_batch_rows` rows (COMPILED_BATCH_ROWS) run through the compiled step, which reads
        every weight once per 16 rows but multiplies it per row; more run through the torch decoder, whose kernels
        dequantize each weight once per step into one GEMM over all rows."""
        if self.native is not None and len(tokens) < self.compiled_batch_rows:
            return self.native(tokens, slots, positions)
        low, high = int(slots.min()), int(slots.max()) + 1
        # Slots low..high-1 run as one batch; idle slots in between are free, so the throwaway token they
        # compute at position 0 overwrites nothing live (a new sequence's prefill rewrites its slot from 0).
        batch_tokens = torch.zeros(high - low, 1, dtype=torch.long)
        batch_positions = torch.zeros(high - low, dtype=torch.long)
        batch_tokens[slots - low, 0] = tokens
        batch_positions[slots - low] = positions
        return self.forward(batch_tokens, slice(low, high), batch_positions)[slots - low]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """rotate_half rotary embedding of the first rope_dim dimensions (all, or Phi-3's partial rotary; none with
        learned positions)."""
        if self.rope_dim == 0:
            return x
        rotary, rest = x[..., :self.rope_dim], x[..., self.rope_dim:]
        half = self.rope_dim // 2
        rotated = torch.cat((-rotary[..., half:], rotary[..., :half]), dim=-1)
        out = rotary * cos + rotated * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool) -> torch.Tensor:
        if self.attn_softcap is None and self.alibi is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.kv_heads != self.heads, scale=self.attn_scale)
        # Soft-capped scores (Gemma 2), ALiBi (BLOOM): SDPA has no hook between the product and the softmax
        group = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = _softcap(q @ keys.transpose(-1, -2) * self.attn_scale, self.attn_softcap)
        if self.alibi is not None:
            scores = scores + self.alibi[:, None, None] * torch.arange(keys.shape[-2], dtype=scores.dtype)
        if causal:
            mask = torch.ones(q.shape[-2], keys.shape[-2], dtype=torch.bool).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ values

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, rows: slice, positions: torch.Tensor, all_logits: bool = False
                ) -> torch.Tensor:
        """Logits for `tokens` [B, S] in cache slots `rows` whose first token sits at `positions` [B].

        S > 1 (prefill) requires B == 1. Returns [B, vocab] for the last token, or [B, S, vocab] if all_logits.
        """
        batch, seq = tokens.shape
        if self.native is not None and not all_logits:
            if seq == 1 and batch < self.compiled_batch_rows:
                return self.native(tokens[:, 0], torch.arange(rows.start or 0, rows.stop), positions)
            if batch == 1 and seq <= self.native_prefill_tokens:
                return self.native.prefill(tokens[0], rows.start or 0, int(positions[0]))
        same_start = batch == 1 or bool((positions == positions[0]).all())
        start = int(positions[0])
        if same_start:
            end = start + seq
            query_positions = torch.arange(start, end)[None]                  # [1, S]
            attend = end
        else:
            assert seq == 1, "sequences at different positions decode one token at a time"
            query_positions = positions[:, None]                               # [B, 1]
            attend = int(positions.max()) + 1
        masks = {window: self._mask(query_positions, attend, window, same_start and start == 0)
                 for window in set(self.windows)}
        batch_index = torch.arange(batch)

        def attention(index: int, layer: _Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache = self.k_cache[index, rows]
            v_cache = self.v_cache[index, rows]
            if same_start:
                k_cache[:, :, start:end] = k
                v_cache[:, :, start:end] = v
            else:
                k_cache[batch_index, :, positions] = k[:, :, 0]
                v_cache[batch_index, :, positions] = v[:, :, 0]
            return self._attend(q, k_cache[:, :, :attend], v_cache[:, :, :attend], masks[layer.window], seq > 1)

        x = self._blocks(tokens, query_positions, attention)
        if not all_logits:
            x = x[:, -1]
        return _softcap(self.lm_head(self.final_norm(x)), self.final_softcap)

    @torch.inference_mode()
    def prefill_prompts(self, prompts: SequenceType[torch.Tensor], slots: SequenceType[int]) -> torch.Tensor:
        """Logits [n, vocab] of the last token of each of n whole prompts (token ids [S_i], from position 0),
        prompt i into cache slot slots[i], computed together: through the compiled step when their tokens number
        at most `native_prefill_tokens`, otherwise through one GEMM per weight over all their tokens (the
        dequantization of each weight, the GEMM path's fixed cost, is paid once for all of them) with attention
        per prompt. Each prompt's logits are those of it prefilled alone up to rounding: the GEMMs' (bf16, other
        blocking), and on AMX CPUs the tiles', which GGUF matmuls of 16 or more rows (32 for the 32-value types) use
        where a prompt alone may not."""
        lengths = [int(p.shape[0]) for p in prompts]
        if not lengths or min(lengths) < 1 or len(slots) != len(lengths) or len(set(slots)) != len(slots):
            raise LowbitError(f"prefill of {len(lengths)} prompts into slots {list(slots)}: every prompt needs a "
                              f"token and its own slot")
        ends = torch.tensor(lengths).cumsum(0)
        tokens = torch.cat(list(prompts)).to(torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths])
        if self.native is not None and len(tokens) <= self.native_prefill_tokens:
            return self.native(tokens, torch.repeat_interleave(torch.tensor(list(slots)), torch.tensor(lengths)),
                               positions, logit_rows=ends - 1)
        if len(lengths) == 1:
            return self.forward(tokens[None], slice(slots[0], slots[0] + 1), torch.tensor([0]))
        bounds = list(zip((ends - torch.tensor(lengths)).tolist(), ends.tolist()))
        # each prompt's mask for each window size (None and causal unless a window is shorter than the prompt)
        masks = {(n, window): self._mask(torch.arange(n)[None], n, window, True)
                 for n in set(lengths) for window in set(self.windows)}

        def attention(index: int, layer: _Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outputs = []
            for (first, last), slot in zip(bounds, slots):
                k_cache, v_cache = self.k_cache[index, slot:slot + 1], self.v_cache[index, slot:slot + 1]
                k_cache[:, :, :last - first] = k[:, :, first:last]
                v_cache[:, :, :last - first] = v[:, :, first:last]
                outputs.append(self._attend(q[:, :, first:last], k_cache[:, :, :last - first],
                                            v_cache[:, :, :last - first], masks[(last - first, layer.window)], True))
            return torch.cat(outputs, dim=2)

        x = self._blocks(tokens[None], positions[None], attention)[0, ends - 1]
        return _softcap(self.lm_head(self.final_norm(x)), self.final_softcap)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: tuple[torch.Tensor | None, bool], prompt: bool) -> torch.Tensor:
        """Attention of q [B, heads, S, D] over cached keys and values [B, kv heads, T, D], in the prompt
        attention dtype for prompts and the cache's for decoding; float32 out."""
        dtype = self.prefill_attention_dtype if prompt else q.dtype
        if keys.dtype != dtype or q.dtype != dtype:
            q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
        return self._attention(q, keys, values, *mask)

    def _blocks(self, tokens: torch.Tensor, query_positions: torch.Tensor,
                attention: Callable[[int, _Layer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        """Hidden states [B, S, hidden] after every block for `tokens` [B, S] at `query_positions` [B or 1, S];
        `attention(layer index, layer, q, k, v)` ([B, heads or kv heads, S, D], rotated) caches k and v and
        returns the attention output [B, heads, S, D]."""
        batch, seq = tokens.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        tables = [(cos[query_positions][:, :, None], sin[query_positions][:, :, None])
                  for cos, sin in zip(self.cos, self.sin)]
        x = self.embed(tokens)
        if self.position_embed is not None:
            x = x + self.position_embed(query_positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for index, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            qkv = layer.qkv(h).view(batch, seq, heads + 2 * kv_heads, head_dim)
            q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
                qk = torch.cat((q, k), dim=2)
            else:
                qk = qkv[:, :, :heads + kv_heads]
            qk = self._rope(qk, *tables[layer.rope]).transpose(1, 2)
            attn = attention(index, layer, qk[:, :heads], qk[:, heads:], v.transpose(1, 2)).to(x.dtype)
            attn = layer.o_proj(attn.transpose(1, 2).reshape(batch, seq, heads * head_dim))
            if self.parallel:                                   # the MLP reads the block's input too
                h = layer.mlp_norm(x)
            else:
                x = x + (layer.attn_out_norm(attn) if layer.attn_out_norm is not None else attn)
                h = layer.mlp_norm(x)
            if layer.moe is not None:
                mlp = layer.moe.module(h)
            elif self.gated:
                gate, up = layer.gate_up(h).split((self.intermediate, self.intermediate), dim=-1)
                mlp = layer.down(_ACTIVATE[self.activation](gate) * up)
            else:
                mlp = layer.down(_ACTIVATE[self.activation](layer.gate_up(h)))
            if self.parallel:
                x = (mlp + attn) + x                            # transformers' order of the sums
            else:
                x = x + (layer.mlp_out_norm(mlp) if layer.mlp_out_norm is not None else mlp)
        return x

    @staticmethod
    def _mask(query_positions: torch.Tensor, attend: int, window: int, from_zero: bool
              ) -> tuple[torch.Tensor | None, bool]:
        """(mask [B or 1, 1, S, attend] of the keys each query sees, or None; is_causal) for queries at
        `query_positions` [B or 1, S]: keys at or before the query, and within `window` of it if window > 0."""
        seq = query_positions.shape[1]
        if window <= 0 or window >= attend:
            if from_zero:
                return None, seq > 1
            if seq == 1 and query_positions.shape[0] == 1:
                return None, False               # one query sees the whole filled prefix
        keys = torch.arange(attend)[None, None, :]
        queries = query_positions[:, :, None]
        mask = keys <= queries
        if 0 < window < attend:
            mask &= keys > queries - window
        return mask[:, None], False


_ACTIVATE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class HFDecoder:
    """Fallback for architectures without a fast path: transformers' forward with one cache per slot."""

    def __init__(self, model: nn.Module, slots: int, context: int, reason: str = ""):
        self.model = model
        self.path = f"transformers forward ({reason})" if reason else "transformers forward"
        self.context = context
        self.caches: list[Any] = [None] * slots

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, rows: slice, positions: torch.Tensor, all_logits: bool = False
                ) -> torch.Tensor:
        from transformers import DynamicCache

        outputs = []
        for i, slot in enumerate(range(rows.start or 0, rows.stop)):
            if int(positions[i]) == 0:
                self.caches[slot] = DynamicCache(config=self.model.config)
            pos = torch.arange(int(positions[i]), int(positions[i]) + tokens.shape[1])[None]
            out = self.model(input_ids=tokens[i:i + 1], past_key_values=self.caches[slot], position_ids=pos,
                             use_cache=True)
            outputs.append(out.logits if all_logits else out.logits[:, -1])
        return torch.cat(outputs)

    def release(self, slot: int) -> None:
        self.caches[slot] = None


# -- the engine ------------------------------------------------------------------------------------------------

def eos_token_ids(model: nn.Module, tokenizer: Any = None) -> tuple[int, ...]:
    """Token ids that end generation: the generation config's eos ids, else the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(dict.fromkeys(int(i) for i in ids))


class Engine:
    """Generate from a loaded model: `generate()` for one prompt, or `start()`/`step()` for many at once."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_batch: int = 1, context: int | None = None,
                 threads: int | None = None, prefill_chunk: int = 512, kv_dtype: torch.dtype = torch.float32,
                 fuse: bool = True, prefill_attention_dtype: torch.dtype | None = None, native: bool = True,
                 activations: Activations | str = Activations.AUTO):
        """`prefill_attention_dtype`: dtype of prompt attention; None picks bf16 (2.5-3x faster here) when the
        model has quantized layers, which already compute in bf16, and float32 for a float model.
        `native`: decode with the compiled whole-step kernel where it applies (False: torch ops only);
        `activations` ("auto", "float32", "int8"): its matmuls' activation arithmetic (runtime/activations.py):
        auto rounds them to int8 for GGUF block weights (llama.cpp's arithmetic on the same file) and keeps float32
        for lowbit's own layouts; "float32" is float32-exact everywhere (equal to transformers up to rounding)."""
        if max_batch < 1:
            raise LowbitError(f"max batch must be >= 1 (got {max_batch})")
        if prefill_chunk < 1:
            raise LowbitError(f"prefill chunk must be >= 1 (got {prefill_chunk})")
        activations = Activations.parse(activations)
        self.threads = set_threads(threads)
        # threads left to lowbit (None): decode steps pick their thread count by timing, for busy machines
        # (one tuner below PREFILL_ROWS rows and one from there: a few rows and a large batch, on the compiled step
        # or the GEMMs, have different best counts, and a trial round must not time one against the other)
        self.thread_tuners = ({False: ThreadTuner(self.threads), True: ThreadTuner(self.threads)}
                              if threads is None and self.threads > 1 else None)
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        model_limit = getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        if context is not None and context < 2:
            raise LowbitError(f"context must be >= 2 tokens (got {context})")
        self.context = min(context or DEFAULT_CONTEXT, model_limit)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_token_ids(model, tokenizer)
        if prefill_attention_dtype is None:
            quantized = any(isinstance(m, QuantLinear) for m in model.modules())
            prefill_attention_dtype = gemm_dtype() if quantized else torch.float32
        blocker = decoder_blocker(model)
        if blocker is None:
            self.decoder: Any = RotaryDecoder(model, max_batch, self.context, kv_dtype, fuse,
                                              prefill_attention_dtype, native, activations)
        else:
            self.decoder = HFDecoder(model, max_batch, self.context, blocker)
        source = getattr(model, "lowbit_source_file", None)
        if source is not None:
            # Pages touched while loading need not stay resident: the kernels read GGUF blocks in place, so the
            # ones they use come back from the page cache on the first step.
            source.release_pages()
        release_freed_heap()
        self.free_slots = list(range(max_batch))
        self.active: list[Sequence] = []
        self.fingerprint = weights_fingerprint(model)
        self.build_options: dict[str, Any] = {}    # engine_for's record of the options it was built with

    def __reduce__(self):
        # A model caches its engine (engine_for). Copying or pickling the model (copy.deepcopy, torch.save) must
        # not copy the cache, whose compiled step holds ctypes pointers into the original's tensors: the copy
        # gets None and builds its own engine when it needs one.
        return _no_engine, ()

    @property
    def fast_path(self) -> bool:
        """True when lowbit's own decoder (static cache; compiled step or torch ops) runs the model."""
        return isinstance(self.decoder, RotaryDecoder)

    @property
    def decode_path(self) -> str:
        """What runs a decode step, and why not the faster one: "compiled step", "torch decoder (reason)" or
        "transformers forward (reason)"."""
        return self.decoder.path

    @property
    def arithmetic(self) -> str:
        """What a decode step computes in: "int8 activations (auto)", "float32 activations (float32)", ..."""
        return getattr(self.decoder, "arithmetic", "float32 activations (transformers)")

    # -- request lifecycle ----------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: SequenceType[int]) -> None:
        """Raise LowbitError if the prompt is empty or leaves no room in the context for one new token."""
        if len(prompt_ids) == 0:
            raise LowbitError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context:
            raise LowbitError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.context} "
                              f"(including at least one generated token); shorten the prompt or raise the context")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise LowbitError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {vocab})")

    def start(self, prompt_ids: SequenceType[int], params: SamplingParams, stop_on_eos: bool = True) -> Sequence:
        """Prefill a new sequence into a free slot and sample its first token (in `sequence.generated`).

        Generation stops at `params.stop_token_ids`, at the model's EOS ids when `stop_on_eos`, at
        `params.max_new_tokens`, or when the context is full (finish_reason "length").
        """
        return self.start_many([self.new_sequence(prompt_ids, params, stop_on_eos)])[0]

    def new_sequence(self, prompt_ids: SequenceType[int], params: SamplingParams, stop_on_eos: bool = True
                     ) -> Sequence:
        """A checked request, not yet started (LowbitError naming the problem for a bad prompt or parameters)."""
        params.validate()
        self.check_prompt(prompt_ids)
        seq = Sequence([int(t) for t in prompt_ids], params, stop_on_eos=stop_on_eos)
        seq.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int.from_bytes(os.urandom(8), "little") >> 1)
        return seq

    def start_many(self, sequences: SequenceType[Sequence]) -> list[Sequence]:
        """Start sequences from `new_sequence` together: each gets a free slot, its prompt is prefilled and its
        first token sampled. Prompts up to `prefill_chunk` tokens are prefilled in groups of up to that many
        tokens at once (RotaryDecoder.prefill_prompts: a server's burst of requests pays the GEMMs' weight
        dequantization once per group, not once per request); longer ones alone, chunk by chunk. If a prefill
        fails, every slot is given back and the error raised."""
        if len({id(seq) for seq in sequences}) != len(sequences) or any(seq.slot != -1 for seq in sequences):
            raise LowbitError("start_many takes new sequences (Engine.new_sequence), each once; one was given twice "
                              "or is already started")
        if not self.free_slots:
            raise LowbitError(f"all {self.max_batch} batch slots are busy")
        if len(sequences) > len(self.free_slots):
            raise LowbitError(f"{len(sequences)} new sequences but only {len(self.free_slots)} of the "
                              f"{self.max_batch} batch slots are free")
        for seq in sequences:
            seq.slot = self.free_slots.pop(0)
        try:
            self._use_threads(self.threads)  # prompt GEMMs keep every core: they do not sync per matmul row block
            for group in self._prefill_groups(sequences):
                began = time.perf_counter()
                if len(group) == 1:
                    logits = self._prefill(group[0])[None]
                else:
                    logits = self.decoder.prefill_prompts([torch.tensor(s.prompt_ids) for s in group],
                                                          [s.slot for s in group])
                    for seq in group:
                        seq.position = len(seq.prompt_ids)
                    self._release_prompt_heap(sum(len(s.prompt_ids) for s in group))
                tokens = sample_rows(logits, [s.params for s in group], [s.generator for s in group])
                for seq, token in zip(group, tokens):
                    seq.prefill_seconds = time.perf_counter() - began
                    self._accept(seq, token)
        except BaseException:
            for seq in sequences:
                self.free_slots.append(seq.slot)
                seq.slot, seq.position = -1, 0
                seq.generated.clear()
                seq.finish_reason = None
            self.free_slots.sort()
            raise
        self.active.extend(sequences)
        return list(sequences)

    def _prefill_groups(self, sequences: SequenceType[Sequence]) -> list[list[Sequence]]:
        """Prompts to prefill together: consecutive ones while their tokens fit in `prefill_chunk` (lowbit's own
        decoder only: transformers' forward takes one sequence at a time); a longer prompt alone."""
        groups: list[list[Sequence]] = []
        tokens = 0
        for seq in sequences:
            size = len(seq.prompt_ids)
            if groups and self.fast_path and tokens + size <= self.prefill_chunk:
                groups[-1].append(seq)
                tokens += size
            else:
                groups.append([seq])
                tokens = size
        return groups

    def _use_threads(self, count: int) -> None:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        ids = seq.prompt_ids
        logits = None
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[begin:begin + self.prefill_chunk]], dtype=torch.long)
            logits = self.decoder.forward(chunk, slice(seq.slot, seq.slot + 1), torch.tensor([begin]))
            seq.position = begin + chunk.shape[1]
        self._release_prompt_heap(len(ids))
        return logits[0]

    def _release_prompt_heap(self, tokens: int) -> None:
        if tokens > getattr(self.decoder, "native_prefill_tokens", 0):
            # the prompt ran through GEMMs whose buffers (activations for every prompt token, dequantized weight
            # slices) glibc would keep resident between requests (Qwen2.5-0.5B, 512 tokens: 130 MB); trimming
            # took 7 ms of CPU against the prompt's 1.35 s, and 1.8 ms against 0.65 s at 128 tokens
            release_freed_heap()

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        params = seq.params
        if (token in self.eos_ids and seq.stop_on_eos) or token in params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= params.max_new_tokens or seq.position + 1 >= self.context:
            seq.finish_reason = "length"

    def step(self) -> list[Sequence]:
        """Decode one token for every unfinished active sequence together; returns the sequences stepped."""
        running = [s for s in self.active if not s.finished]
        if not running:
            return []
        if not self.fast_path:
            for s in running:
                logits = self.decoder.forward(torch.tensor([[s.generated[-1]]]), slice(s.slot, s.slot + 1),
                                              torch.tensor([s.position]))
                s.position += 1
                self._accept(s, sample_token(logits[0], s.params, s.generator))
            return running
        tuner = self.thread_tuners[len(running) >= PREFILL_ROWS] if self.thread_tuners else None
        if tuner is not None:
            self._use_threads(tuner.threads())
            started = time.perf_counter()
        logits = self.decoder.decode(torch.tensor([s.generated[-1] for s in running]),
                                     torch.tensor([s.slot for s in running]),
                                     torch.tensor([s.position for s in running]))
        if tuner is not None:
            tuner.record(time.perf_counter() - started, len(running))
        tokens = sample_rows(logits, [s.params for s in running], [s.generator for s in running])
        for s, token in zip(running, tokens):
            s.position += 1
            self._accept(s, token)
        return running

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        """Free the sequence's slot (marking it finished with `reason` if it was still running)."""
        if seq.finish_reason is None:
            seq.finish_reason = reason or "cancelled"
        if seq in self.active:
            self.active.remove(seq)
            if isinstance(self.decoder, HFDecoder):
                self.decoder.release(seq.slot)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    # -- one prompt -------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: SequenceType[int], params: SamplingParams, stop_on_eos: bool = True
                 ) -> Iterator[int]:
        """Stream the generated token ids for one prompt (EOS and stop tokens are yielded, then it stops)."""
        seq = self.start(prompt_ids, params, stop_on_eos)
        try:
            yield seq.generated[-1]
            while not seq.finished:
                self.step()
                yield seq.generated[-1]
        finally:
            self.release(seq)

    @torch.inference_mode()
    def logits(self, token_ids: SequenceType[int]) -> torch.Tensor:
        """Logits [len, vocab] for every position of `token_ids`, computed through the engine's cache path."""
        self.check_prompt(list(token_ids)[:-1] or list(token_ids))
        slot = self.free_slots[0] if self.free_slots else None
        if slot is None:
            raise LowbitError("all batch slots are busy")
        out = []
        ids = list(token_ids)
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[begin:begin + self.prefill_chunk]], dtype=torch.long)
            out.append(self.decoder.forward(chunk, slice(slot, slot + 1), torch.tensor([begin]), all_logits=True)[0])
        if isinstance(self.decoder, HFDecoder):
            self.decoder.release(slot)
        return torch.cat(out)


def weights_fingerprint(model: nn.Module) -> tuple:
    """Identity and version of every weight, so an engine built on fused copies notices in-place changes
    (quantizing the model after generating from it must not keep running the old weights)."""
    marks = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            marks.append((id(module), id(module.qweight), module.kernel_preference))
        elif isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            marks.append((id(module), module.weight.data_ptr(), module.weight._version))
    return tuple(marks)


def _no_engine() -> None:
    return None


def engine_for(model: nn.Module, tokenizer: Any = None, context: int | None = None, max_batch: int = 1,
               threads: int | None = None) -> Engine:
    """The engine cached on `model`, rebuilt only when a larger context or batch is asked for."""
    set_threads(threads)
    engine = getattr(model, "_lowbit_engine", None)
    wanted = context or DEFAULT_CONTEXT
    limit = getattr(model.config, "max_position_embeddings", None) or wanted
    # `lowbit_engine_options` on the model: Engine keywords its owner chose (e.g. the CLI's --activations)
    options = dict(getattr(model, "lowbit_engine_options", {}))
    if (engine is None or engine.context < min(wanted, limit) or engine.max_batch < max_batch or engine.active
            or engine.fingerprint != weights_fingerprint(model) or engine.build_options != options):
        engine = None
        model._lowbit_engine = None      # free the old cache before allocating the new one
        engine = Engine(model, tokenizer, max_batch=max_batch, context=wanted, **options)
        engine.build_options = options
        model._lowbit_engine = engine
    return engine


def engine_generate_ids(model: nn.Module, input_ids: torch.Tensor, params: SamplingParams, stats: Any = None
                        ) -> Iterator[int]:
    """`lowbit.engine.generate.generate_ids` on lowbit's engine: same arguments, same stops, same stats."""
    params.validate()
    ids = [int(t) for t in input_ids.reshape(-1)]
    needed = len(ids) + params.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and needed > limit:
        raise LowbitError(f"prompt ({len(ids)} tokens) + {params.max_new_tokens} new tokens exceeds the "
                          f"model's context of {limit}; shorten the prompt or lower -n")
    engine = engine_for(model, context=max(needed, DEFAULT_CONTEXT))
    if stats is not None:
        stats.prompt_tokens = len(ids)
    seq = engine.start(ids, params, stop_on_eos=False)
    try:
        if stats is not None:
            stats.prompt_seconds = seq.prefill_seconds
        began = time.perf_counter()
        while True:
            token = seq.generated[-1]
            if stats is not None:
                stats.token_ids.append(token)
                stats.new_tokens += 1
                stats.decode_seconds = time.perf_counter() - began
            yield token
            if seq.finished:
                break
            if len(seq.generated) == 1:
                began = time.perf_counter()   # decode time starts after the first (prefill) token
            engine.step()
    finally:
        engine.release(seq)


def supports_engine(model: nn.Module) -> bool:
    """True when lowbit's fast decoder runs this model's architecture."""
    return getattr(model, "config", None) is not None and decoder_blocker(model) is None
