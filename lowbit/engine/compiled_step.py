"""The engine's compiled decode step (runtime/csrc/decode.c): a whole token step of a pre-norm rotary decoder
(Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3; Mixtral, Qwen2-MoE, Qwen3-MoE with their routed experts; GPT-NeoX,
GPT-2, OPT, BLOOM, Falcon with LayerNorms) in one C call.

`NativeDecodeStep.build(decoder)` describes the decoder (a RotaryDecoder, which read the family's facts from its
Architecture: norms and their (1 + w), sandwich norms, activation, q/k norms, partial rotary, per-layer rotary
tables and windows, soft-capping, attention scale) to the C code once, as ctypes structures pointing at tensors
kept alive here. It returns no step, with the reason, when anything is outside what the C step handles: a layer
that is neither affine per group (integer grids, GPTQ act-order through a column order, AWQ, GGUF blocks) nor an
NF4/FP4 codebook (LLM.int8's outliers, dynamic int8), a non-float32 KV cache, or no compiled library. The engine
then keeps running its torch decoder.

q and k weights held in their stored row order with an output order (QuantLinear.output_order: a GGUF file's
llama.cpp interleaved-rope rows, read where they lie) are multiplied as stored and each head gathered in order by
C (lb_model.qk_head_order), when every q and k head of every layer takes the same order within the head; any
other output order is a reason not to run the model.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.checks import check_decode_model, check_status, check_step_inputs
from lowbit.runtime.activations import Activations
from lowbit.runtime.clib import FLOAT_KINDS, LinearSpec, linear_spec, native_library, uses_act8

log = logging.getLogger("lowbit")

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SMALL_MODEL_BYTES = 8 << 20    # below this many weight bytes a token step runs on one thread


class MoESpec(ctypes.Structure):
    """decode.c's lb_moe: router (and shared-expert gate) and every expert's gate, up, down."""

    _fields_ = [("n_experts", _i64), ("top_k", _i64), ("renormalize", _i64), ("shared", _i64),
                ("router", LinearSpec * 2), ("experts", ctypes.POINTER(LinearSpec))]


class LayerSpec(ctypes.Structure):
    """decode.c's lb_layer (qkv and gate_up: up to 3 and 2 weights whose outputs are concatenated)."""

    _fields_ = [("input_norm", _ptr), ("mlp_norm", _ptr), ("attn_out_norm", _ptr), ("mlp_out_norm", _ptr),
                ("q_norm", _ptr), ("k_norm", _ptr), ("cos", _ptr), ("sin", _ptr), ("window", _i64),
                ("qkv", LinearSpec * 3), ("o", LinearSpec), ("gate_up", LinearSpec * 2), ("down", LinearSpec),
                ("moe", ctypes.POINTER(MoESpec)), ("input_norm_bias", _ptr), ("mlp_norm_bias", _ptr)]


class ModelSpec(ctypes.Structure):
    """decode.c's lb_model."""

    _fields_ = [("n_layers", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("rope_dim", _i64), ("intermediate", _i64), ("context", _i64), ("slots", _i64),
                ("norm_eps", _f32), ("q_norm_eps", _f32), ("k_norm_eps", _f32), ("attn_scale", _f32),
                ("attn_softcap", _f32), ("final_softcap", _f32), ("activation", _i64), ("activations", _i64),
                ("layers", ctypes.POINTER(LayerSpec)), ("final_norm", _ptr), ("lm_head", LinearSpec),
                ("k_cache", _ptr), ("v_cache", _ptr), ("layer_norm", _i64), ("gated", _i64), ("parallel", _i64),
                ("final_norm_bias", _ptr), ("alibi", _ptr), ("qk_head_order", _ptr)]


ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}   # decode.c's LB_ACT_*


def _norm_weight(norm: Any, keep: list[torch.Tensor], part: str = "weight") -> int | None:
    """Pointer to a decoder norm's float32 factor (or `part` "bias", a LayerNorm's) kept alive in `keep`, or None
    when the norm (or its bias) is absent."""
    if norm is None or getattr(norm, part, None) is None:
        return None
    weight = getattr(norm, part).detach().float().contiguous()
    keep.append(weight)
    return weight.data_ptr()


def _described(modules: list[Any], keep: list[torch.Tensor], stored_order: bool = False) -> list[LinearSpec] | None:
    """The lb_linear of each module (their tensors kept alive in `keep`), or None if one has a layout the
    compiled step cannot read. `stored_order`: QuantLinears with output orders as their rows are stored (q and k,
    whose heads the step gathers in order itself; clib.linear_spec)."""
    described = [linear_spec(module, stored_order) for module in modules]
    if any(d is None for d in described):
        return None
    keep.extend(t for d in described for t in d[1])
    return [d[0] for d in described]


def _router_linear(router: nn.Module) -> nn.Module:
    """A router as a Linear the step can describe: a quantized or plain Linear as it is, transformers' TopKRouter
    modules (a bare [experts, hidden] weight) as a float Linear over that weight."""
    from lowbit.models.arch.base import is_linear
    from lowbit.runtime.qlinear import QuantLinear

    if isinstance(router, QuantLinear) or is_linear(router):
        return router
    from lowbit.engine.runner import _DenseLinear

    return _DenseLinear(router.weight.detach(), None)


def _moe_spec(moe: Any, keep: list[torch.Tensor], structures: list[Any]) -> tuple[MoESpec | None, str]:
    """(decode.c's lb_moe for a decoder's expert layer, "") or (None, why the step cannot run it)."""
    if moe.experts is None:
        return None, "expert weights fused in 3-D tensors (not one Linear per expert)"
    if any(getattr(m, "bias", None) is not None for expert in moe.experts for m in expert):
        return None, "expert projections with biases"
    router = _described([_router_linear(moe.router)], keep)
    gate = _described([_router_linear(moe.shared_gate)], keep) if moe.shared_gate is not None else [LinearSpec()]
    experts = _described([m for expert in moe.experts for m in expert], keep)
    if router is None or gate is None or experts is None:
        return None, "an expert or router weight layout the compiled step cannot read"
    shared = int(moe.shared_gate is not None)
    if len(experts) != 3 * (moe.n_experts + shared):     # decode.c reads gate, up, down of every expert
        return None, (f"{len(experts)} expert projections for {moe.n_experts} experts"
                      f"{' and a shared one' if shared else ''} (gate, up, down each)")
    array = (LinearSpec * len(experts))(*experts)
    structures.append(array)
    spec = MoESpec(moe.n_experts, moe.top_k, int(moe.renormalize), shared,
                   (LinearSpec * 2)(router[0], gate[0]), array)
    structures.append(spec)
    return spec, ""


def _output_order(module: Any) -> torch.Tensor | None:
    return getattr(module, "output_order", None)


def head_order_of(order: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor | None:
    """The order within one head when `order` (a q or k projection's output order over heads x head_dim) applies
    the same order to every head (head h's outputs are h * head_dim + it); else None."""
    if order.numel() != heads * head_dim:
        return None
    per_head = order.view(heads, head_dim) - torch.arange(heads)[:, None] * head_dim
    first = per_head[0].to(torch.int64).contiguous()     # C reads head_dim int64 values, each of 0..head_dim-1 once
    if not bool((per_head == first).all()) or not torch.equal(torch.sort(first).values, torch.arange(head_dim)):
        return None
    return first.clone()


def qk_head_order(decoder: Any) -> tuple[torch.Tensor | None, str]:
    """(The one order within a head that every layer's q and k outputs take from their stored rows, or None when
    no weight has an output order, ""), or (None, why the step cannot put the outputs in order): it gathers q and
    k heads only, by one order for all heads and layers."""
    head_order, found_in = None, None
    for index, layer in enumerate(decoder.layers):
        others = [("o", [layer.o_proj]), ("gate|up", layer.gate_up_parts), ("down", [layer.down])]
        if layer.moe is not None:
            moe = layer.moe
            others.append(("router", [moe.router, moe.shared_gate]))
            others.append(("experts", [m for expert in moe.experts or [] for m in expert]))
        parts = layer.qkv_parts
        if len(parts) != 3:
            others.append(("fused q|k|v", parts))
        for name, modules in others:
            if any(_output_order(m) is not None for m in modules):
                return None, f"layer {index} {name}: outputs in another order than stored (only q and k reordered)"
        if len(parts) != 3:
            continue
        q, k, v = (_output_order(m) for m in parts)
        if v is not None:
            return None, f"layer {index} v: outputs in another order than stored (only q and k reordered)"
        orders = (None if q is None else head_order_of(q, decoder.heads, decoder.head_dim),
                  None if k is None else head_order_of(k, decoder.kv_heads, decoder.head_dim))
        if (q is None) != (k is None) or (q is not None and (orders[0] is None or orders[1] is None
                                                             or not torch.equal(orders[0], orders[1]))):
            return None, f"layer {index}: q and k outputs not reordered by one order within every head"
        layer_order = orders[0]
        if index and (layer_order is None) != (head_order is None) or (
                layer_order is not None and head_order is not None and not torch.equal(layer_order, head_order)):
            return None, f"layers {found_in} and {index}: q and k outputs reordered differently"
        head_order, found_in = layer_order, index
    if _output_order(decoder.lm_head) is not None:
        return None, "lm_head: outputs in another order than stored"
    return head_order, ""


def _matmuls(layer: LayerSpec) -> list[LinearSpec]:
    """Every weight a layer's step multiplies by: attention, and the MLP's or the expert layer's router, shared
    expert gate and every expert's gate, up and down."""
    parts = [*layer.qkv, layer.o, *layer.gate_up, layer.down]
    if layer.moe:
        moe = layer.moe.contents
        parts += [*moe.router, *(moe.experts[i] for i in range(3 * (moe.n_experts + moe.shared)))]
    return [part for part in parts if part.n]


class NativeDecodeStep:
    """Callable (tokens [B], slots [B], positions [B]) -> logits [B, vocab] for a RotaryDecoder."""

    def __init__(self, lib: ctypes.CDLL, spec: ModelSpec, layers: Any, keep: list[torch.Tensor],
                 caches: tuple[torch.Tensor, torch.Tensor], embed: nn.Module, vocab: int, arithmetic: str,
                 structures: list[Any] = (), position_embed: Any = None, embed_norm: Any = None):
        self.lib, self.spec, self.layers, self.keep = lib, spec, layers, keep
        self.structures = list(structures)     # ctypes structures the layers point to (expert layers)
        self.embed, self.vocab = embed, vocab
        self.arithmetic = arithmetic       # what the matmuls compute in, for people reading a benchmark
        self.position_embed = position_embed   # learned positions (GPT-2, OPT), added to the embedding
        self.embed_norm = embed_norm           # BLOOM's norm of the embeddings
        # token ids index the embedding, whose rows may differ from the head's outputs (padded vocabularies)
        rows = getattr(embed, "num_embeddings", None) or getattr(getattr(embed, "qweight", None), "shape", (vocab,))[0]
        self.embedding_rows = int(rows)
        self.workspace: torch.Tensor | None = None
        self.tile_share = 0.0                  # set by build: the weights whose many-row matmuls use AMX tiles
        self.prefill_layout = "float"          # set by build: see NATIVE_PREFILL_TOKENS in engine/runner.py
        self.caches = caches                   # the KV caches spec points to (C checks their sizes every call)
        # A step has 7 barriers a layer; for a model this small they cost more than a second thread saves
        # (and on a busy machine a preempted thread stalls every one of them).
        weight_bytes = sum(t.numel() * t.element_size() for t in keep)
        self.max_threads = 1 if weight_bytes < SMALL_MODEL_BYTES else None

    @classmethod
    def build(cls, decoder: Any, activations: Activations = Activations.FLOAT32
              ) -> tuple[NativeDecodeStep | None, str]:
        """(the compiled step for `decoder` (a RotaryDecoder), "") or (None, why it cannot run it).
        `activations`: the matmuls' activation arithmetic (runtime/activations.py)."""
        def unsupported(reason: str) -> tuple[None, str]:
            log.debug("compiled decode step not used: %s", reason)
            return None, reason

        lib = native_library()
        if lib is None:
            return unsupported("no compiled library")
        if decoder.k_cache.dtype != torch.float32:
            return unsupported(f"KV cache dtype {decoder.k_cache.dtype}")
        if decoder.heads % decoder.kv_heads:
            return unsupported("heads not a multiple of kv heads")
        hidden_norms = [n for layer in decoder.layers for n in (layer.input_norm, layer.mlp_norm, layer.attn_out_norm,
                                                                 layer.mlp_out_norm) if n is not None]
        if len({n.eps for n in hidden_norms + [decoder.final_norm]}) > 1:
            return unsupported("norms with different epsilons")
        head_order, reason = qk_head_order(decoder)
        if reason:
            return unsupported(reason)
        keep: list[torch.Tensor] = []
        structures: list[Any] = []
        layer_specs = []
        for index, layer in enumerate(decoder.layers):
            specs = {}
            moe = None
            if not layer.qkv_parts:
                return unsupported(f"layer {index}: fused q|k|v rows the step cannot reorder")
            if layer.moe is not None and decoder.parallel:
                return unsupported("experts in a parallel attention + MLP block")
            if layer.moe is not None:    # the expert layer replaces gate|up and down (absent: n == 0)
                moe, reason = _moe_spec(layer.moe, keep, structures)
                if moe is None:
                    return unsupported(f"layer {index}: {reason}")
                specs["gate_up"], specs["down"] = [LinearSpec(), LinearSpec()], [LinearSpec()]
            for name, modules in (("qkv", layer.qkv_parts), ("o", [layer.o_proj]),
                                  ("gate_up", layer.gate_up_parts), ("down", [layer.down])):
                if name in specs:
                    continue
                described = _described(modules, keep, stored_order=name == "qkv" and head_order is not None)
                if described is None:
                    return unsupported(f"layer {index} {name}: a weight layout the compiled step cannot read")
                specs[name] = described
            layer_specs.append(LayerSpec(
                *(_norm_weight(norm, keep) for norm in (layer.input_norm, layer.mlp_norm, layer.attn_out_norm,
                                                        layer.mlp_out_norm, layer.q_norm, layer.k_norm)),
                decoder.cos[layer.rope].data_ptr(), decoder.sin[layer.rope].data_ptr(), layer.window,
                (LinearSpec * 3)(*specs["qkv"]), specs["o"][0], (LinearSpec * 2)(*specs["gate_up"]),
                specs["down"][0], ctypes.pointer(moe) if moe is not None else None,
                _norm_weight(layer.input_norm, keep, "bias"), _norm_weight(layer.mlp_norm, keep, "bias")))
        head = linear_spec(decoder.lm_head)
        if head is None:
            return unsupported("lm_head weight layout not handled")
        keep.extend(head[1])
        first = decoder.layers[0]
        layers = (LayerSpec * len(layer_specs))(*layer_specs)
        alibi = None
        if decoder.alibi is not None:
            keep.append(decoder.alibi)
            alibi = decoder.alibi.data_ptr()
        keep.extend(decoder.cos + decoder.sin)
        keep.extend([decoder.k_cache, decoder.v_cache])   # C writes them: alive as long as the step, not its decoder
        if head_order is not None:
            keep.append(head_order)
        spec = ModelSpec(
            len(layer_specs), decoder.hidden, decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.rope_dim,
            decoder.intermediate, decoder.context, decoder.k_cache.shape[1],
            first.input_norm.eps, first.q_norm.eps if first.q_norm is not None else 0.0,
            first.k_norm.eps if first.k_norm is not None else 0.0, decoder.attn_scale,
            decoder.attn_softcap or 0.0, decoder.final_softcap or 0.0, ACTIVATION_CODES[decoder.activation],
            activations.code, layers, _norm_weight(decoder.final_norm, keep), head[0],
            decoder.k_cache.data_ptr(), decoder.v_cache.data_ptr(), int(decoder.layer_norm), int(decoder.gated),
            int(decoder.parallel), _norm_weight(decoder.final_norm, keep, "bias"), alibi,
            head_order.data_ptr() if head_order is not None else None)
        check_decode_model(lib, spec, decoder, keep)    # every pointer's bytes, before C ever reads them
        weights = [part for layer in layer_specs for part in _matmuls(layer)] + [head[0]]
        rounded = sum(uses_act8(w, activations, lib) for w in weights)
        arithmetic = ("float32 activations" if rounded == 0 else "int8 activations" if rounded == len(weights)
                      else f"int8 activations in {rounded} of {len(weights)} matmuls, float32 in the others")
        step = cls(lib, spec, layers, keep, (decoder.k_cache, decoder.v_cache), decoder.embed, head[0].n,
                   f"{arithmetic} ({activations.value})", structures, decoder.position_embed, decoder.embed_norm)
        # the share of the weights (by count) whose many-row matmuls (32 rows) run on AMX tiles, by C's own rule
        tiled = [w for w in weights if lib.lowbit_amx_fits(ctypes.byref(w), 32, activations.code)]
        step.tile_share = sum(w.n * w.k for w in tiled) / max(1, sum(w.n * w.k for w in weights))
        # what prompts through this step compute with, which sets how long a prompt it takes (runner's
        # NATIVE_PREFILL_TOKENS): int8 activations on tiles or on vector kernels, quantized codes, or float weights
        step.prefill_layout = (("int8 tiles" if step.tile_share > 0.5 else "int8 blocks") if rounded
                               else "codes" if any(w.kind not in FLOAT_KINDS.values() for w in weights) else "float")
        return step, ""

    def prefill(self, tokens: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `tokens` [S], a prompt chunk for cache slot `slot` from `start`
        (float32 throughout, like decoding; worth it for short chunks, where a GEMM gains little)."""
        count = tokens.shape[0]
        if count == 0:      # C would normalise and multiply row -1, the last of none
            raise LowbitError("compiled step: a prompt chunk of no tokens has no last token's logits")
        return self(tokens, torch.full((count,), slot), torch.arange(start, start + count),
                    logit_rows=torch.tensor([count - 1]))

    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of every row, or [R, vocab] of the rows `logit_rows` names (the last token of each
        prompt when several prompts are prefilled together: rows of one slot at consecutive positions)."""
        batch = tokens.shape[0]
        if logit_rows is not None:
            logit_rows = logit_rows.to(torch.int64).contiguous()
        check_step_inputs(tokens, slots, positions, self.embedding_rows, self.spec.slots, self.spec.context,
                          logit_rows)
        threads = min(torch.get_num_threads(), self.max_threads or torch.get_num_threads())
        size = ctypes.c_int64()
        check_status(self.lib.lowbit_decode_workspace(ctypes.byref(self.spec), batch, threads, ctypes.byref(size)),
                     f"compiled step of {batch} rows", self.lib)
        if self.workspace is None or self.workspace.numel() < size.value:
            self.workspace = torch.empty(size.value, dtype=torch.float32)
        x = self.embed(tokens).float()
        if self.position_embed is not None:             # learned positions (GPT-2, OPT)
            x = x + self.position_embed(positions).float()
        if self.embed_norm is not None:                 # BLOOM's norm of the embeddings
            x = self.embed_norm(x)
        if tuple(x.shape) != (batch, self.spec.hidden):  # C reads batch x hidden floats from x
            raise LowbitError(f"compiled step: the embedding gives rows of shape {list(x.shape[1:])}, and the model's "
                              f"hidden size is {self.spec.hidden}; the model does not match its configuration")
        x = x.contiguous()
        slots = slots.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        logits = torch.empty(batch if logit_rows is None else logit_rows.numel(), self.vocab, dtype=torch.float32)
        check_status(self.lib.lowbit_decode_step(
            ctypes.byref(self.spec), x.data_ptr(), x.numel(), batch, slots.data_ptr(), slots.numel(),
            positions.data_ptr(), positions.numel(), logits.data_ptr(), logits.numel(), self.workspace.data_ptr(),
            self.workspace.numel(), self.caches[0].numel(), self.caches[1].numel(), threads,
            logit_rows.data_ptr() if logit_rows is not None else None,
            logit_rows.numel() if logit_rows is not None else 0),
            f"compiled step of {batch} rows", self.lib)
        return logits
