"""Checks run on weight descriptions right before they are handed to the compiled kernels through ctypes.

Loaders validate files (lowbit.models.validate); this is the last line: every `lb_linear` a compiled step points
to has the shape the model's dimensions say (hidden, heads x head_dim, intermediate, vocab), and the buffers behind
its pointers hold the bytes its layout makes the kernels read (csrc/checks.c's `lowbit_check_linear`, the kernels'
own rules). A failure is a LowbitError naming the weight, instead of C reading past a buffer.
"""
from __future__ import annotations

import ctypes
from typing import Any, Iterable

import torch

from lowbit.errors import LowbitError

_CHECK_MESSAGES = {
    1: "an unknown layout or statistics kind", 2: "sizes that do not cover its columns",
    3: "a nibble layout with columns or groups the kernels cannot split", 4: "fewer weight bytes than its shape needs",
    5: "fewer group statistics than its shape needs", 6: "a bias shorter than its outputs",
    7: "a column order shorter than its inputs or naming columns outside them", 8: "a code table it cannot use",
    9: "sizes that overflow",
}


def buffer_sizes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{data pointer: bytes from it to the end of its storage} of every tensor a description keeps alive."""
    sizes: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        available = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        sizes[t.data_ptr()] = max(sizes.get(t.data_ptr(), 0), available)
    return sizes


def _bytes_at(pointer: int | None, sizes: dict[int, int], what: str, field: str) -> int:
    if not pointer:
        return 0
    if pointer not in sizes:
        raise LowbitError(f"compiled step: {what}.{field} points to memory the description does not keep alive; "
                          "this is a lowbit bug, please report it")
    return sizes[pointer]


def check_linear(lib: ctypes.CDLL, spec: Any, sizes: dict[int, int], what: str) -> None:
    """csrc/checks.c's verdict on one lb_linear (`spec`, a clib.LinearSpec) given the buffers behind it."""
    check = lib.lowbit_check_linear
    check.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6
    check.restype = ctypes.c_int64
    code = check(ctypes.byref(spec), *(_bytes_at(getattr(spec, f), sizes, what, f)
                                       for f in ("w", "a", "b", "bias", "perm", "table")))
    if code:
        raise LowbitError(f"compiled step: weight {what} ({spec.n} x {spec.k}) has "
                          f"{_CHECK_MESSAGES.get(code, f'check failure {code}')}; the model is corrupt")


def _expect(what: str, have: tuple[int, ...], need: tuple[int, ...]) -> None:
    if tuple(have) != tuple(need):
        raise LowbitError(f"compiled step: {what} is {list(have)}, but the model's dimensions need {list(need)}; "
                          "the model does not match its configuration")


def check_decode_model(lib: ctypes.CDLL, spec: Any, decoder: Any, keep: list[torch.Tensor]) -> None:
    """Every weight, norm, rotary table and cache a compiled decode step (compiled_step.ModelSpec) points to fits
    the model's dimensions, and csrc/checks.c accepts each weight's buffers."""
    sizes = buffer_sizes(keep + [decoder.k_cache, decoder.v_cache])
    hidden, heads, kv, head_dim = spec.hidden, spec.heads, spec.kv_heads, spec.head_dim
    inter, context = spec.intermediate, spec.context
    if min(hidden, heads, kv, head_dim, inter, context, spec.n_layers) <= 0 or heads % kv:
        raise LowbitError(f"compiled step: dimensions hidden={hidden} heads={heads} kv_heads={kv} "
                          f"head_dim={head_dim} intermediate={inter} context={context} are not a valid model")

    def parts(what: str, linears: Any, count: int, outputs: int, inputs: int) -> None:
        present = [linears[i] for i in range(count) if linears[i].n]
        _expect(f"{what} outputs", (sum(p.n for p in present),), (outputs,))
        for index, part in enumerate(present):
            _expect(f"{what}[{index}] inputs", (part.k,), (inputs,))
            check_linear(lib, part, sizes, f"{what}[{index}]")

    def norm(what: str, pointer: int | None, size: int, required: bool = True) -> None:
        if not pointer:
            if required:
                raise LowbitError(f"compiled step: {what} is missing")
            return
        available = _bytes_at(pointer, sizes, what, "weight") // 4
        if available < size:
            raise LowbitError(f"compiled step: {what} holds {available} values, and the model needs {size}")

    for index in range(spec.n_layers):
        layer = spec.layers[index]
        where = f"layer {index}"
        parts(f"{where} q|k|v", layer.qkv, 3, (heads + 2 * kv) * head_dim, hidden)
        parts(f"{where} o", (layer.o,), 1, hidden, heads * head_dim)
        if layer.moe:
            check_experts(lib, layer.moe.contents, sizes, where, hidden, parts)
        else:
            parts(f"{where} gate|up", layer.gate_up, 2, (2 if spec.gated else 1) * inter, hidden)
            parts(f"{where} down", (layer.down,), 1, hidden, inter)
        norm(f"{where} input norm", layer.input_norm, hidden)
        norm(f"{where} MLP norm", layer.mlp_norm, hidden)
        norm(f"{where} input norm bias", layer.input_norm_bias, hidden, required=False)
        norm(f"{where} MLP norm bias", layer.mlp_norm_bias, hidden, required=False)
        norm(f"{where} attention output norm", layer.attn_out_norm, hidden, required=False)
        norm(f"{where} MLP output norm", layer.mlp_out_norm, hidden, required=False)
        norm(f"{where} q norm", layer.q_norm, head_dim, required=False)
        norm(f"{where} k norm", layer.k_norm, head_dim, required=False)
        norm(f"{where} rotary cos", layer.cos, context * spec.rope_dim, required=spec.rope_dim > 0)
        norm(f"{where} rotary sin", layer.sin, context * spec.rope_dim, required=spec.rope_dim > 0)
    norm("final norm", spec.final_norm, hidden)
    norm("final norm bias", spec.final_norm_bias, hidden, required=False)
    norm("ALiBi slopes", spec.alibi, heads, required=False)
    vocab = decoder.embed.num_embeddings if hasattr(decoder.embed, "num_embeddings") else spec.lm_head.n
    parts("lm_head", (spec.lm_head,), 1, vocab, hidden)
    if not 0 <= spec.rope_dim <= head_dim or spec.rope_dim % 2:      # 0: learned positions, no rotary
        raise LowbitError(f"compiled step: rotary width {spec.rope_dim} does not fit head_dim {head_dim}")
    cache = (spec.n_layers, spec.slots, kv, context, head_dim)
    for name in ("k_cache", "v_cache"):
        _expect(name, tuple(getattr(decoder, name).shape), cache)


def check_experts(lib: ctypes.CDLL, moe: Any, sizes: dict[int, int], where: str, hidden: int, parts: Any) -> None:
    """An expert layer (compiled_step.MoESpec): router and shared gate read the hidden state and give one logit per
    expert (and the shared one); every expert is gate, up [width, hidden] and down [hidden, width]."""
    experts, shared = moe.n_experts, moe.shared
    if experts <= 0 or not 0 < moe.top_k <= experts or shared not in (0, 1):
        raise LowbitError(f"compiled step: {where} has {experts} experts, top_k {moe.top_k} and shared {shared}; "
                          "the model does not match its configuration")
    parts(f"{where} router", moe.router, 2, experts + shared, hidden)
    for e in range(experts + shared):
        gate, up, down = (moe.experts[3 * e + i] for i in range(3))
        what = f"{where} expert {e}"
        parts(f"{what} gate", (gate,), 1, gate.n, hidden)
        parts(f"{what} up", (up,), 1, gate.n, hidden)
        parts(f"{what} down", (down,), 1, hidden, gate.n)
        if gate.n <= 0 or any(p.bias for p in (gate, up, down)):
            raise LowbitError(f"compiled step: {what} has width {gate.n} or biases; the step reads experts "
                              "without biases")


def check_step_inputs(tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, vocab: int,
                      n_slots: int, context: int) -> None:
    """The indices a compiled step writes the cache at and reads the embedding with are inside their tables."""
    batch = tokens.shape[0]
    if slots.shape != (batch,) or positions.shape != (batch,):
        raise LowbitError(f"compiled step: {batch} tokens with {tuple(slots.shape)} slots and "
                          f"{tuple(positions.shape)} positions")
    for what, values, limit in (("token", tokens, vocab), ("slot", slots, n_slots), ("position", positions, context)):
        if batch and (int(values.min()) < 0 or int(values.max()) >= limit):
            raise LowbitError(f"compiled step: a {what} index outside 0..{limit - 1} "
                              f"({int(values.min())}..{int(values.max())})")
