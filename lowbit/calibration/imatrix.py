"""Importance matrix ("imatrix"): the mean squared activation of every input column of every Linear.

llama.cpp's llama-imatrix collects exactly this statistic over calibration text and its quantizers weight
each value's rounding error by it (quant_weights). Columns that carry large activations matter more for the
layer's output, so the block search spends its precision there. Feed the result to
`GGMLScheme.quantize(w, importance=...)` or `export_gguf(..., importance=...)`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


@torch.no_grad()
def collect_imatrix(model: nn.Module, batch: torch.Tensor, batch_size: int = 4,
                    skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """{Linear module name: float32 [in_features] mean of x^2 over every calibration token}."""
    if batch.dim() != 2 or batch.numel() == 0:
        raise LowbitError(f"imatrix needs token windows [n_samples, seq_len], got shape {tuple(batch.shape)}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(s and s in name for s in skip):
            hooks.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        for start in range(0, batch.shape[0], batch_size):
            model(batch[start:start + batch_size].long())
    finally:
        for h in hooks:
            h.remove()
    log.info("imatrix: %d layers, %d tokens", len(sums), batch.numel())
    return {name: (sums[name] / counts[name]).float() for name in sums}


def imatrix_from_file(model: nn.Module, tokenizer: Any, path: str | Path, n_samples: int = 32,
                      seq_len: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """collect_imatrix over seeded token windows of a local text file (`--imatrix-data FILE`)."""
    from lowbit.calibration.text import calibration_from_file

    batch = calibration_from_file(tokenizer, path, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return collect_imatrix(model, batch)
