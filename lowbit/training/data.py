"""Training text: the file's tokens split into a training part and a held-out tail, batches drawn by step.

The held-out part is the end of the text (never trained on), so "perplexity on the training domain" is measured
on text the adapter has not seen. A step's batch depends only on (seed, step, micro-step): a resumed run draws
exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.calibration.text import read_text, tokenize_for_calibration
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


@dataclass
class TrainingText:
    """Token ids of the training part and of the held-out part of one text."""

    train: torch.Tensor
    held_out: torch.Tensor
    source: str = "text"

    def batch(self, seq_len: int, batch: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
        """[batch, seq_len] windows of the training tokens at offsets drawn from (seed, step, micro)."""
        if self.train.numel() < seq_len + 1:
            raise LowbitError(f"{self.source} has {self.train.numel()} training tokens, fewer than one window of "
                              f"--seq-len {seq_len}; use a longer text or a smaller --seq-len")
        generator = torch.Generator().manual_seed(hash_step(seed, step, micro))
        starts = torch.randint(0, self.train.numel() - seq_len + 1, (batch,), generator=generator)
        return torch.stack([self.train[s:s + seq_len] for s in starts.tolist()])

    def windows(self, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
        """[n, seq_len] seeded windows of the training tokens (calibration batches for qat and re-quantization)."""
        from lowbit.calibration.text import sample_windows

        return sample_windows(self.train, n, seq_len, seed, source=f"{self.source} (training part)")


def hash_step(seed: int, step: int, micro: int) -> int:
    """One generator seed per (seed, step, micro-step), far apart for nearby steps."""
    return (seed * 1_000_003 + step * 7919 + micro * 104_729) % (2 ** 63 - 1)


def training_text(tokenizer: Any, path: str | Path, held_out: float = 0.1) -> TrainingText:
    """Tokenize `path` and keep its last `held_out` fraction of tokens for evaluation only."""
    text = read_text(path, "training text", "pass an existing text file with --data")
    tokens = tokenize_for_calibration(tokenizer, text)
    cut = int(tokens.numel() * (1 - held_out))
    data = TrainingText(tokens[:cut], tokens[cut:], source=f"training text {path}")
    log.info("training text %s: %d tokens to train on, %d held out", path, data.train.numel(), data.held_out.numel())
    return data
