"""Perplexity, KL-divergence and top-1 agreement over non-overlapping windows of a text."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.calibration.text import read_text, self_generated_tokens
from lowbit.errors import LowbitError


def evaluation_tokens(model, tokenizer, data: str | Path | None, max_tokens: int | None, ctx: int,
                      seed: int = 0) -> torch.Tensor:
    """Tokens of a text file, or (no file) `max_tokens` tokens the model writes itself, in windows of ctx."""
    if data:
        return tokenize_text(tokenizer, read_text(data), max_tokens)
    n_tokens = max_tokens or 4 * ctx
    windows_needed = -(-n_tokens // ctx)
    return self_generated_tokens(model, windows_needed, ctx, seed, purpose="evaluation").reshape(-1)[:n_tokens]


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of the text's tokens (no special tokens), truncated to `max_tokens`."""
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer; evaluation needs one")
    if max_tokens:
        # Tokenizing a whole corpus to keep 50k tokens is wasteful: take a generous prefix of characters.
        text = text[: max_tokens * 12]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def windows(tokens: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    """Non-overlapping windows of exactly `ctx` tokens (the tail shorter than ctx is dropped)."""
    n = tokens.numel() // ctx
    if n == 0:
        raise LowbitError(f"the text has {tokens.numel()} tokens, fewer than one window of --ctx {ctx}; "
                          "use a longer text or a smaller --ctx")
    return [tokens[i * ctx:(i + 1) * ctx] for i in range(n)]


@torch.no_grad()
def window_logits(model, window: torch.Tensor) -> torch.Tensor:
    return model(window.unsqueeze(0), use_cache=False).logits[0].float()


@dataclass
class QualityReport:
    """Figures of a quantized model against its text and (optionally) its unquantized base."""

    perplexity: float
    tokens: int
    base_perplexity: float | None = None
    kld: float | None = None
    top1_agreement: float | None = None


@torch.no_grad()
def evaluate_quality(model, tokens: torch.Tensor, ctx: int = 512, base=None, progress: bool = True
                     ) -> QualityReport:
    """Perplexity of `model`; with `base`, also its perplexity, mean KL(base || model) and top-1 agreement."""
    nll = base_nll = kld = 0.0
    agree = count = 0
    for window in tqdm(windows(tokens, ctx), desc="eval", unit="window", disable=not progress):
        logits = window_logits(model, window)[:-1]
        target = window[1:]
        logp = F.log_softmax(logits, dim=-1)
        nll += F.nll_loss(logp, target, reduction="sum").item()
        count += target.numel()
        if base is not None:
            base_logp = F.log_softmax(window_logits(base, window)[:-1], dim=-1)
            base_nll += F.nll_loss(base_logp, target, reduction="sum").item()
            kld += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
    report = QualityReport(perplexity=math.exp(nll / count), tokens=count)
    if base is not None:
        report.base_perplexity = math.exp(base_nll / count)
        report.kld = kld / count
        report.top1_agreement = agree / count
    return report
