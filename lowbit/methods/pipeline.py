"""Walk a model's decoder blocks and quantize their Linear layers with a method, one block at a time."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lowbit.methods.base import Method, QuantizeConfig, get_method
from lowbit.models.arch import architecture_for
from lowbit.models.arch.base import linear_weight
from lowbit.runtime.surgery import install_quantized, iter_linears, matches_any

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


def quantize_model(model: nn.Module, config: QuantizeConfig, calibration: Any = None, progress: bool = True,
                   kernel: str = "auto") -> nn.Module:
    """Quantize `model` in place with `config` (calibration token batches for methods that need them)."""
    method = get_method(config)
    architecture_for(model).prepare(model)   # e.g. experts as one Linear per projection
    skip = effective_skip(model, config)
    check_model(model, method, skip)
    if method.needs_calibration:
        run = getattr(method, "quantize_model", None)
        if run is None:
            raise NotImplementedError(f"method {method.name} needs a calibrated driver")
        run(model, calibration, progress=progress, kernel=kernel)
    else:
        _quantize_weight_only(model, method, skip, progress, kernel)
    model.lowbit_config = config
    return model


def _quantize_weight_only(model: nn.Module, method: Method, skip: tuple[str, ...], progress: bool,
                          kernel: str) -> None:
    adapter = architecture_for(model)
    blocks = adapter.blocks(model)
    bar = tqdm(range(len(blocks)), desc=f"{method.name} quantize", unit="layer", disable=not progress)
    for i in bar:
        prefix = adapter.block_prefix(i)
        linears = block_linears(blocks[i], prefix, skip)
        codes = method.quantize_block(blocks[i], {n: _as_linear_view(m) for n, m in linears.items()})
        for name, qw in codes.items():
            install_quantized(model, f"{prefix}.{name}", qw, kernel)
    # Linears outside the decoder blocks (lm_head unless skipped).
    block_root = adapter.blocks_path + "."
    for name, module in list(iter_linears(model, "", skip)):
        if not name.startswith(block_root) and not matches_any(name, skip):
            log.info("quantizing %s", name)
            install_quantized(model, name, method.quantize_weight(name, linear_weight(module).detach()), kernel)


class _LinearView:
    """Linear-like view with an [out, in] weight, hiding GPT-2's transposed Conv1D layout from methods."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.weight = linear_weight(module)
        self.bias = getattr(module, "bias", None)
        self.out_features, self.in_features = self.weight.shape


def _as_linear_view(module: nn.Module):
    return module if isinstance(module, nn.Linear) else _LinearView(module)
