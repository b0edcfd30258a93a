"""The one block walk of quantization: every method, in memory or streamed from shards, goes through `walk`.

`walk(method, source, sink)` takes the decoder blocks one at a time from a `BlockSource` (the model in memory,
or safetensors shards on disk for `--stream`), asks the method for the block's codes (`Method.quantize_block`,
which returns a `BlockResult` and installs nothing), installs them into the block so it runs quantized, runs
it to produce the next block's calibration inputs (calibrated methods: each block is calibrated on what the
quantized blocks before it produce), and hands the block to a `BlockSink` (install in place, or write a part
file). The Linears outside the blocks (the head unless skipped) are rounded on the method's grid and handed
to the sink too. The reports come back from `walk`, keyed by full module name.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from torch import nn
from tqdm.auto import tqdm

from lowbit.methods.base import BlockResult, Method, QuantizeConfig, get_method
from lowbit.models.arch import architecture_for
from lowbit.models.arch.base import linear_weight
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme
from lowbit.runtime.surgery import install_quantized, iter_linears, matches_any, set_kernel

log = logging.getLogger("lowbit")


def block_linears(block: nn.Module, prefix: str, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linears of one block keyed by their name inside the block, minus the skipped ones."""
    return {full[len(prefix) + 1:]: mod for full, mod in iter_linears(block, prefix, skip)}


def effective_skip(model: nn.Module, config: QuantizeConfig) -> tuple[str, ...]:
    """The user's skip patterns plus the Linears the architecture keeps in float (tiny expert gates)."""
    return tuple(config.skip) + architecture_for(model).keep_float


def check_model(model: nn.Module, method: Method, skip: tuple[str, ...]) -> None:
    """Validate every layer before any work, so a bad group size fails at once with the layer's name."""
    for name, module in iter_linears(model, "", skip):
        method.check_layer(name, module)


def outside_linears(model: nn.Module, blocks_path: str, skip: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The Linears that are not in a decoder block and not skipped (the head unless skipped)."""
    root = blocks_path + "."
    return [(name, module) for name, module in iter_linears(model, "", skip)
            if not name.startswith(root) and not matches_any(name, skip)]


class BlockSource(Protocol):
    """Where the walk gets its blocks: `model` has every module (blocks possibly on the meta device) and
    `block(i)` returns block i with real weights."""

    model: nn.Module

    def block(self, index: int) -> nn.Module: ...


class BlockSink(Protocol):
    """Where the walk puts what it made: `put_block` gets each finished block (its Linears are QuantLinears),
    `put_outside` each quantized Linear outside the blocks, `finish` is called once at the end."""

    def put_block(self, index: int, prefix: str, block: nn.Module) -> None: ...

    def put_outside(self, name: str, module: nn.Module, qweight: QuantizedWeight) -> None: ...

    def finish(self) -> None: ...


class InMemory:
    """Source and sink for a model in memory: its own blocks, quantized in place with `kernel`."""

    def __init__(self, model: nn.Module, kernel: str = "auto"):
        self.model = model
        self.kernel = kernel
        self._blocks = architecture_for(model).blocks(model)

    def block(self, index: int) -> nn.Module:
        return self._blocks[index]

    def put_block(self, index: int, prefix: str, block: nn.Module) -> None:
        """The block was quantized in place: nothing more to do."""

    def put_outside(self, name: str, module: nn.Module, qweight: QuantizedWeight) -> None:
        install_quantized(self.model, name, qweight, self.kernel)

    def finish(self) -> None:
        set_kernel(self.model, self.kernel)


def walk(method: Method, source: BlockSource, sink: BlockSink, calibration: Any = None, progress: bool = True,
         desc: str | None = None) -> dict[str, Any]:
    """Quantize every decoder block of `source.model` with `method` into `sink`; returns the per-Linear reports
    (full module name -> report) of calibrated methods.

    `calibration` (calibrated methods): token ids, a CalibrationRequest, a text file, or None (self-generated
    text; needs the whole model)."""
    from lowbit.calibration.capture import capture_block_calls, run_block
    from lowbit.calibration.text import calibration_batch

    model = source.model
    arch = architecture_for(model)
    floats = method.plan_layers(model)
    skip = effective_skip(model, method.config) + tuple(floats)
    check_model(model, method, skip)
    recorded = calls = batch = None
    if method.needs_calibration:
        options = method.config.options
        batch = calibration_batch(model, calibration, options.get("calib_samples"), options.get("calib_len"),
                                  options.get("seed"))
        model.eval()
        # timed and reported on its own, before the per-layer bar starts, so the bar's rate and ETA are the layers'
        began = time.perf_counter()
        # windows per recorded call: the user's, else the method's default, else 8 (qat steps per window: split_windows)
        chunk = options.get("chunk") or getattr(method, "defaults", {}).get("chunk") or 8
        recorded = capture_block_calls(model, arch, batch, int(chunk))
        log.info("%s: calibration: %d x %d tokens prepared and the blocks' calls captured in %.1f s",
                 method.name, batch.shape[0], batch.shape[1], time.perf_counter() - began)
    n_blocks = len(arch.blocks(model))
    began = time.perf_counter()
    reports: dict[str, Any] = {}
    worst: list[str] = []
    bar = tqdm(range(n_blocks), desc=desc or f"{method.name} quantize", unit="layer", disable=not progress)
    for i in bar:
        block = source.block(i)
        prefix = arch.block_prefix(i)
        if recorded is not None:   # the previous block's outputs, with this block's layer type's mask and rope
            calls = recorded.calls_for(i, calls)
        result: BlockResult = method.quantize_block(block, block_linears(block, prefix, skip), calls, arch, prefix)
        result.install(block)
        # only a model in memory has every block to run the whole model with (streamed blocks are on meta)
        result = method.after_block(model if isinstance(source, InMemory) else None, block, prefix, batch, result)
        reports.update({f"{prefix}.{name}": report for name, report in result.reports.items()})
        error = result.worst_error()
        if error is not None:
            worst.append(f"err={error:.2e}")
            bar.set_postfix_str(worst[-1])
        if calls is not None and i + 1 < n_blocks:
            calls = run_block(block, calls)
        sink.put_block(i, prefix, block)
    log.info("%s: %d decoder layers in %.1f s (%.2f s per layer)", method.name, n_blocks,
             time.perf_counter() - began, (time.perf_counter() - began) / max(n_blocks, 1))
    if worst:
        log.info("%s: per-layer worst relative output error: %s", method.name, ", ".join(worst))
    for name, module in outside_linears(model, arch.blocks_path, skip):
        if method.needs_calibration:
            log.info("%s: %s is outside the decoder blocks: rounded to nearest on the same grid", method.name, name)
        else:
            log.info("quantizing %s", name)
        sink.put_outside(name, module, method.quantize_weight(name, linear_weight(module).detach()))
    sink.finish()
    return reports


def quantize_model(model: nn.Module, config: QuantizeConfig, calibration: Any = None, progress: bool = True,
                   kernel: str = "auto", layer_schemes: dict[str, Scheme] | None = None) -> nn.Module:
    """Quantize `model` in place with `config` (calibration token batches for methods that need them);
    `layer_schemes` (full Linear name -> Scheme) overrides the method's scheme for those layers (merge's kept
    grids).

    The per-Linear reports of calibrated methods are left on `model.lowbit_reports`."""
    method = get_method(config)
    method.layer_schemes.update(layer_schemes or {})
    architecture_for(model).prepare(model)   # e.g. experts as one Linear per projection
    memory = InMemory(model, kernel)
    model.lowbit_reports = walk(method, memory, memory, calibration, progress)
    model.lowbit_config = config
    return model
