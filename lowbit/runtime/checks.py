"""Checks run on weight descriptions right before they are handed to the compiled kernels through ctypes.

Loaders validate files (lowbit.models.validate); this is the last line: every `lb_linear` a compiled step points
to has the shape the model's dimensions say (hidden, heads x head_dim, intermediate, vocab; csrc/decode.c's
`lowbit_check_model`), and the buffers behind its pointers hold the bytes its layout makes the kernels read
(csrc/checks.c's `lowbit_check_linear`, the kernels' own rules). A failure is a LowbitError naming the weight,
instead of C reading past a buffer. Every call into the library returns a status (csrc/checks.h) that
`check_status` turns into a one-line LowbitError.
"""
from __future__ import annotations

import ctypes
from typing import Any, Iterable

import torch

from lowbit.errors import LowbitError


def check_status(code: int, what: str, lib: ctypes.CDLL | None = None) -> None:
    """Nothing for status 0 of a compiled entry point (csrc/checks.h); else a one-line LowbitError naming `what`
    and the problem in the library's words (lowbit_status_text)."""
    if code == 0:
        return
    if lib is None:
        from lowbit.runtime.clib import native_library

        lib = native_library()
    text = lib.lowbit_status_text(code).decode() if lib is not None else "an error"
    raise LowbitError(f"{what}: {text} (status {code})")


def status_text(lib: ctypes.CDLL, code: int) -> str:
    """The library's words for a status code (what check_status puts in its error)."""
    return lib.lowbit_status_text(code).decode()


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
    code = lib.lowbit_check_linear(ctypes.byref(spec), *(_bytes_at(getattr(spec, f), sizes, what, f)
                                                         for f in ("w", "a", "b", "bias", "perm", "table")))
    check_status(code, f"compiled kernels: weight {what} ({spec.n} x {spec.k}) has a corrupt description", lib)


def check_decode_model(lib: ctypes.CDLL, spec: Any, decoder: Any, keep: list[torch.Tensor]) -> None:
    """A compiled decode step's model (compiled_step.ModelSpec) before its first call: csrc/decode.c's
    lowbit_check_model on its structure (flags, dimensions, every weight's shape against them, missing parts), then
    the bytes behind every pointer it holds, which only Python knows (weights through csrc/checks.c, norms, rotary
    tables, caches)."""
    sizes = buffer_sizes(keep + [decoder.k_cache, decoder.v_cache])
    if spec.qk_head_order:        # lowbit_check_model reads its head_dim values
        available = _bytes_at(spec.qk_head_order, sizes, "model", "qk_head_order") // 8
        if available < spec.head_dim:
            raise LowbitError(f"compiled step: the q/k head order holds {available} values, and the heads have "
                              f"{spec.head_dim} dimensions")
    detail = ctypes.create_string_buffer(256)
    code = lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail))
    check_status(code, f"compiled step: {detail.value.decode(errors='replace')}", lib)
    hidden, head_dim, context = spec.hidden, spec.head_dim, spec.context

    def weights(what: str, linears: Any) -> None:
        for index, part in enumerate(p for p in linears if p.n):
            check_linear(lib, part, sizes, f"{what}[{index}]")

    def norm(what: str, pointer: int | None, size: int) -> None:
        if not pointer:          # lowbit_check_model refused missing required ones
            return
        available = _bytes_at(pointer, sizes, what, "weight") // 4
        if available < size:
            raise LowbitError(f"compiled step: {what} holds {available} values, and the model needs {size}")

    for index in range(spec.n_layers):
        layer = spec.layers[index]
        where = f"layer {index}"
        for what, linears in (("q|k|v", layer.qkv), ("o", [layer.o]), ("gate|up", layer.gate_up),
                              ("down", [layer.down])):
            weights(f"{where} {what}", linears)
        if layer.moe:
            moe = layer.moe.contents
            weights(f"{where} router", moe.router)
            for e in range(moe.n_experts + moe.shared):
                weights(f"{where} expert {e}", [moe.experts[3 * e + i] for i in range(3)])
        for what, pointer in (("input norm", layer.input_norm), ("MLP norm", layer.mlp_norm),
                              ("input norm bias", layer.input_norm_bias), ("MLP norm bias", layer.mlp_norm_bias),
                              ("attention output norm", layer.attn_out_norm), ("MLP output norm", layer.mlp_out_norm)):
            norm(f"{where} {what}", pointer, hidden)
        norm(f"{where} q norm", layer.q_norm, head_dim)
        norm(f"{where} k norm", layer.k_norm, head_dim)
        norm(f"{where} rotary cos", layer.cos, context * spec.rope_dim)
        norm(f"{where} rotary sin", layer.sin, context * spec.rope_dim)
    norm("final norm", spec.final_norm, hidden)
    norm("final norm bias", spec.final_norm_bias, hidden)
    norm("ALiBi slopes", spec.alibi, spec.heads)
    vocab = decoder.embed.num_embeddings if hasattr(decoder.embed, "num_embeddings") else spec.lm_head.n
    if spec.lm_head.n != vocab:
        raise LowbitError(f"compiled step: lm_head gives {spec.lm_head.n} logits, and the embedding has {vocab} "
                          "rows; the model does not match its configuration")
    weights("lm_head", [spec.lm_head])
    cache = (spec.n_layers, spec.slots, spec.kv_heads, context, head_dim)
    for name in ("k_cache", "v_cache"):
        if tuple(getattr(decoder, name).shape) != cache:
            raise LowbitError(f"compiled step: {name} is {list(getattr(decoder, name).shape)}, but the model's "
                              f"dimensions need {list(cache)}; the model does not match its configuration")


def check_step_inputs(tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, vocab: int,
                      n_slots: int, context: int, logit_rows: torch.Tensor | None = None) -> None:
    """The indices a compiled step writes the cache at and reads the embedding with are inside their tables, and
    the rows whose logits it is asked for (1 to all of them) are rows of the step."""
    batch = tokens.shape[0]
    if slots.shape != (batch,) or positions.shape != (batch,):
        raise LowbitError(f"compiled step: {batch} tokens with {tuple(slots.shape)} slots and "
                          f"{tuple(positions.shape)} positions")
    if logit_rows is not None and not 1 <= logit_rows.numel() <= batch:
        raise LowbitError(f"compiled step: logits of {logit_rows.numel()} rows asked of a {batch}-row step")
    indices = [("token", tokens, vocab), ("slot", slots, n_slots), ("position", positions, context)]
    if logit_rows is not None:
        indices.append(("logit row", logit_rows, batch))
    for what, values, limit in indices:
        if batch and (int(values.min()) < 0 or int(values.max()) >= limit):
            raise LowbitError(f"compiled step: a {what} index outside 0..{limit - 1} "
                              f"({int(values.min())}..{int(values.max())})")
