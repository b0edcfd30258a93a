"""Layer-by-layer calibration: capture how the model calls its decoder blocks, and run a block on recorded calls.

The embeddings run once on the calibration batch; stand-ins for the first blocks record the hidden states and
every keyword argument the model passes its decoder layers (attention mask, position ids, rotary position
embeddings in transformers 5), then stop the forward pass. Families whose layers differ by type
(`Architecture.layer_types`: sliding-window and global layers) get a mask, and in Gemma 3 a rotary table, per
type, so the first block of each type records its call and the blocks between pass the hidden states on
without running. From there each block is calibrated on its recorded inputs (its own type's arguments with the
hidden states the block before produced), quantized, and re-run (now quantized) to produce the next block's
inputs, so each block is calibrated on the activations it will really see (true-sequential across blocks);
the walk itself is `lowbit.methods.pipeline.walk`. Only one block needs real weights at a time, which is what
`streaming.py` builds on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.arch.base import Architecture as ArchAdapter

log = logging.getLogger("lowbit")

DEFAULT_CHUNK = 8   # calibration samples per forward pass: bounds attention memory at long --calib-len


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed activations are recorded."""


@dataclass
class BlockCall:
    """One recorded call of a decoder block: positional args (hidden states first) and keyword args."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        return BlockCall((hidden, *self.args[1:]), self.kwargs)


def split_windows(call: BlockCall) -> list[BlockCall]:
    """One call per calibration window of `call`: every tensor argument whose leading dimension is the batch's
    (hidden states, masks, per-window position ids and rotary tables) is sliced, and so is Bloom's `alibi`, whose
    leading dimension is windows x heads, window-major; shared ones (a [1, ...] rotary table, 1-D cache positions)
    are passed on whole. Lets a method step per window on calls recorded in chunks."""
    n = call.hidden.shape[0]
    if n == 1:
        return [call]

    def window(value: Any, i: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value[i:i + 1] if value.dim() >= 2 and value.shape[0] == n else value
        if isinstance(value, (tuple, list)):
            return type(value)(window(v, i) for v in value)
        if isinstance(value, dict):
            return {k: window_of_kwarg(k, v, i) for k, v in value.items()}
        return value

    def window_of_kwarg(key: str, value: Any, i: int) -> Any:
        if key == "alibi" and isinstance(value, torch.Tensor) and value.shape[0] % n == 0:
            heads = value.shape[0] // n
            return value[i * heads:(i + 1) * heads]
        return window(value, i)

    return [BlockCall(window(call.args, i), window(call.kwargs, i)) for i in range(n)]


class _BlockStandIn(nn.Module):
    """Stands in for a decoder block while the model's forward pass runs for its block calls: records how the
    model calls the block (`calls` not None), passes the hidden states on unchanged (nothing of the real block
    runs, so a streamed block may stay on the meta device), or stops the forward pass (`last`)."""

    def __init__(self, original: nn.Module, calls: list[BlockCall] | None, last: bool):
        super().__init__()
        self.calls = calls
        self.last = last
        # Some models pick the mask per layer from attributes of the layer (sliding vs full attention).
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, *args: Any, **kwargs: Any):
        if not args:
            args = (kwargs.pop("hidden_states"),)
        if self.calls is not None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
            kwargs["use_cache"] = False
            self.calls.append(BlockCall(tuple(args), kwargs))
        if self.last:
            raise _StopForward
        return args[0]


@dataclass
class RecordedCalls:
    """How the model calls its decoder blocks on each calibration chunk: `by_type[t][c]` is the call of a block
    of layer type `t` on chunk `c`, and `types[i]` block i's type. Families whose layers differ by type give each
    type its own attention mask (sliding window or not) and, in Gemma 3, its own rotary table; the others have
    one type, ""."""

    types: list[str]
    by_type: dict[str, list[BlockCall]]

    @property
    def first(self) -> list[BlockCall]:
        """Block 0's calls, with the hidden states that enter it."""
        return self.by_type[self.types[0]]

    def calls_for(self, index: int, previous: list[BlockCall] | None) -> list[BlockCall]:
        """Block `index`'s calls: the hidden states of `previous` (what the block before produced; None for
        block 0) with the arguments of the block's own layer type. Block 0's are handed over once, with the hidden
        states entering it: the record keeps only the arguments after that (every later block takes its
        predecessor's outputs), so those activations are freed once the walk has run block 0 on them, as they
        were when block 0's calls were all that was recorded."""
        own = self.by_type[self.types[index]]
        if previous is None:
            self.by_type = {t: [call.with_hidden(None) for call in calls] for t, calls in self.by_type.items()}
            return own
        return [call.with_hidden(prior.hidden) for call, prior in zip(own, previous)]


def layer_types(model: nn.Module, adapter: ArchAdapter, n_blocks: int) -> list[str]:
    """Each decoder block's layer type (the config attribute the architecture names), "" for every block when
    the family's layers do not differ by type."""
    types = getattr(model.config, adapter.layer_types, None) if adapter.layer_types else None
    if not types:
        return [""] * n_blocks
    if len(types) != n_blocks:
        raise LowbitError(f"config.{adapter.layer_types} names {len(types)} layer types for {n_blocks} decoder "
                          "layers; the config does not match the model")
    return list(types)


@torch.no_grad()
def capture_block_calls(model: nn.Module, adapter: ArchAdapter, batch: torch.Tensor,
                        chunk: int = DEFAULT_CHUNK) -> RecordedCalls:
    """Run the model's embeddings on `batch` [n, L] in chunks and record, for each chunk, the call of the first
    block of every layer type (blocks before the last of those are passed through, not run)."""
    blocks = adapter.blocks(model)
    if len(blocks) == 0:
        raise LowbitError(f"the model has no decoder layers at {adapter.blocks_path}; nothing to calibrate")
    types = layer_types(model, adapter, len(blocks))
    first_of_type = {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(first_of_type.values())
    by_type: dict[str, list[BlockCall]] = {t: [] for t in first_of_type}
    originals = [blocks[i] for i in range(last + 1)]
    for i, original in enumerate(originals):
        blocks[i] = _BlockStandIn(original, by_type[types[i]] if first_of_type[types[i]] == i else None, i == last)
    try:
        for start in range(0, batch.shape[0], chunk):
            ids = batch[start:start + chunk]
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, original in enumerate(originals):
            blocks[i] = original
    expected = (batch.shape[0] + chunk - 1) // chunk
    for t, index in first_of_type.items():
        if len(by_type[t]) != expected:
            raise LowbitError(f"could not capture the inputs of {adapter.blocks_path}.{index}: the model's forward "
                              "pass did not call that decoder layer")
    return RecordedCalls(types, by_type)


def capture_first_block_inputs(model: nn.Module, adapter: ArchAdapter, batch: torch.Tensor,
                               chunk: int = DEFAULT_CHUNK) -> list[BlockCall]:
    """Block 0's calls on `batch` [n, L] in chunks (`capture_block_calls` has every layer type's)."""
    return capture_block_calls(model, adapter, batch, chunk).first


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple in older layouts)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """The next block's inputs: this block applied to every recorded call."""
    return [call.with_hidden(block_output(block(*call.args, **call.kwargs))) for call in calls]


@torch.no_grad()
def collect_inputs(block: nn.Module, modules: dict[str, nn.Module], calls: list[BlockCall],
                   on_input: Callable[[str, tuple, dict], None], stop_early: bool = True,
                   optional: frozenset[str] | set[str] = frozenset()) -> None:
    """Call `on_input(name, args, kwargs)` with what each of `modules` receives while `block` runs on `calls`.

    With `stop_early`, each forward pass ends as soon as every watched module has seen its input, so
    collecting the inputs of a block's first Linears does not pay for the rest of the block. Modules in
    `optional` (experts, which see only the tokens routed to them) may not be called at all.
    """
    required = set(modules) - set(optional)
    stop_early = stop_early and not optional
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            on_input(name, args, kwargs)
            seen.add(name)
            if stop_early and len(seen) == len(modules):
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        for call in calls:
            seen.clear()
            try:
                block(*call.args, **call.kwargs)
            except _StopForward:
                pass
            if not required <= seen:
                missing = sorted(required - seen)
                raise LowbitError(f"calibration: modules {missing} were not called by their decoder block; "
                                  "the architecture adapter does not match this model")
    finally:
        for h in handles:
            h.remove()


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The activation a module receives (its first positional argument or `hidden_states`)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., K] activations -> [tokens, K] float32."""
    return x.reshape(-1, x.shape[-1]).float()
