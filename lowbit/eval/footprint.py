"""Memory footprint and bits per weight of a (possibly quantized) model, like transformers'
get_memory_footprint but counting quantized layers at their stored size."""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lowbit.runtime.surgery import quantized_modules


@dataclass
class Footprint:
    parameter_bytes: int          # floating-point parameters (embeddings, norms, unquantized Linears)
    buffer_bytes: int
    quantized_bytes: int          # quantized layers at their stored size (codes + statistics)
    quantized_weights: int        # number of weights held quantized
    total_weights: int            # every weight of the model, quantized or not

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes + self.quantized_bytes

    @property
    def quantized_bits_per_weight(self) -> float | None:
        """Average stored bits per weight over the quantized layers only."""
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else None

    @property
    def model_bits_per_weight(self) -> float:
        """Average stored bits per weight over the whole model (unquantized tensors at their dtype)."""
        return 8 * (self.parameter_bytes + self.quantized_bytes) / self.total_weights


def footprint(model: nn.Module) -> Footprint:
    """Count every tensor once (tied weights share storage)."""
    seen: set[int] = set()
    param_bytes = n_params = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        param_bytes += p.numel() * p.element_size()
        n_params += p.numel()
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    q_bits = q_weights = 0
    for _, module in quantized_modules(model):
        q_bits += module.qweight.storage_bits()
        q_weights += module.qweight.shape[0] * module.qweight.shape[1]
    return Footprint(param_bytes, buffer_bytes, (q_bits + 7) // 8, q_weights, n_params + q_weights)


def path_size(path: str | Path) -> int:
    """Bytes of a file or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
