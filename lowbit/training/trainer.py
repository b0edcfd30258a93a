"""The training loop: seeded batches by step, gradient accumulation, warm-up + cosine learning rate, a progress
bar with loss and tokens/s, and checkpoints that a resumed run continues from bit for bit."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.training.config import FinetuneConfig
from lowbit.training.data import hash_step

log = logging.getLogger("lowbit")

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainLog:
    """What a run did: loss per step, wall time, tokens seen."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.losses), 1)


def learning_rate(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak at the last step."""
    peak = config.learning_rate
    warmup = min(config.warmup, config.steps - 1)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(config.steps - warmup - 1, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW, or 8-bit AdamW (the QLoRA recipe's optimizer states) through bitsandbytes' CPU implementation, else
    lowbit's own (bitsandbytes' blockwise dynamic 8-bit states, lowbit.training.optim)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    from lowbit.training.optim import adamw_8bit

    return adamw_8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, config: FinetuneConfig,
                    history: TrainLog) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "params": {k: v.detach().clone() for k, v in trainable(model).items()},
                "optimizer": optimizer.state_dict(), "config": config.to_dict(), "losses": history.losses,
                "tokens": history.tokens, "seconds": history.seconds}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: FinetuneConfig,
                    history: TrainLog) -> int:
    """Restore parameters, optimizer and history; returns the step to continue from."""
    if not path.is_file():
        raise LowbitError(f"--resume: no checkpoint at {path}; start without --resume")
    state = torch.load(path, weights_only=False)
    saved = dict(state["config"])
    mine = config.to_dict()
    differ = sorted(k for k in mine if k not in ("checkpoint_every", "eval_tokens", "extra") and saved.get(k) != mine[k])
    if differ:
        raise LowbitError(f"--resume: the checkpoint was trained with different {', '.join(differ)}; resume with "
                          "the same options")
    params = trainable(model)
    if set(params) != set(state["params"]):
        raise LowbitError(f"--resume: the checkpoint at {path} holds other parameters than this model trains")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    history.losses, history.tokens, history.seconds = list(state["losses"]), state["tokens"], state["seconds"]
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


def train(model: nn.Module, batches: Callable[[int, int], torch.Tensor], config: FinetuneConfig,
          checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
          desc: str = "finetune") -> TrainLog:
    """Train the parameters of `model` that require grad for `config.steps` optimizer steps on causal-LM loss.

    `batches(step, micro)` gives the [batch, seq_len] token ids of one micro-step (a pure function of its
    arguments, so a resumed run sees the same data). Dropout is seeded per micro-step too."""
    from lowbit.runtime.cpu import float32_arithmetic

    params = list(trainable(model).values())
    if not params:
        raise LowbitError("nothing to train: no parameter requires a gradient")
    optimizer = make_optimizer(params, config)
    history = TrainLog()
    checkpoint = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    start = load_checkpoint(checkpoint, model, optimizer, config, history) if resume and checkpoint else 0
    model.train()
    bar = tqdm(range(start, config.steps), desc=desc, unit="step", disable=not progress, initial=start,
               total=config.steps)
    for step in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        tokens = 0
        for micro in range(config.grad_accum):
            ids = batches(step, micro)
            torch.manual_seed(hash_step(config.seed, step, micro))
            with float32_arithmetic():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
            tokens += ids.numel()
        if not math.isfinite(total):
            raise LowbitError(f"the loss became {total} at step {step}; lower --lr")
        optimizer.step()
        elapsed = time.perf_counter() - began
        history.losses.append(total)
        history.tokens += tokens
        history.seconds += elapsed
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens / elapsed:.0f}")
        done = step + 1
        if checkpoint is not None and (done == config.steps or (config.checkpoint_every
                                                               and done % config.checkpoint_every == 0)):
            save_checkpoint(checkpoint, model, optimizer, done, config, history)
    model.eval()
    return history
