"""Quantization-aware training end to end (issue 14), on top of the block-wise method `lowbit.methods.qat`:
the integer grids' scales trained on the language-model loss with codes fixed (`train_scales`, EfficientQAT's
E2E-QP), and a merged model's re-quantized layers distilled towards the float merged model (`distill_merged`)."""
from __future__ import annotations

import contextlib

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.qat import FakeQuantLinear, cosine, fake_quantizer, qat_optimizer
from lowbit.runtime.qlinear import DequantizedMatmul, QuantLinear
from lowbit.schemes.base import expand_groups
from lowbit.schemes.intgrid import _SCALE_DTYPES, IntGrid


# -- end to end: the integer grids' scales trained on the language-model loss, codes fixed (EfficientQAT's E2E-QP)
class ScaleTrainableLinear(nn.Module):
    """A QuantLinear on an integer grid whose per-group scales train (log space), codes and zeros fixed."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        qw = quantized.qweight
        self.quantized = quantized
        self.group_index = qw.group_index()
        self.log_scale = nn.Parameter(qw.scales.float().clamp(min=1e-12).log())

    def centered_codes(self) -> torch.Tensor:
        qw = self.quantized.qweight
        return qw.codes.float() - expand_groups(qw.zeros, self.group_index)

    def weight_from(self, log_scale: torch.Tensor) -> torch.Tensor:
        return expand_groups(log_scale.exp(), self.group_index) * self.centered_codes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DequantizedMatmul.apply(x, self.weight_from, self.log_scale)
        bias = self.quantized.bias
        return y if bias is None else y + bias

    @torch.no_grad()
    def finish(self) -> nn.Module:
        """The QuantLinear with the learned scales (rounded to the grid's scale dtype)."""
        qw = self.quantized.qweight
        qw.scales = self.log_scale.exp().to(_SCALE_DTYPES[qw.scheme.scale_dtype]).float()
        self.quantized.set_kernel(self.quantized.kernel_preference)   # repack with the new scales
        return self.quantized


def train_scales(model: nn.Module, batches: torch.Tensor, steps: int, lr: float = 1e-3, seed: int = 0,
                 progress: bool = False) -> list[float]:
    """Train the scales of every integer-grid QuantLinear of `model` on the language-model loss of `batches`
    ([n, L] token windows, `steps` passes of one window batch each, cycling): the codes stay as chosen. Returns the
    losses. Other layers (float, NF4, GGUF) stay as they are."""
    from tqdm.auto import tqdm

    from lowbit.runtime.surgery import replace_module

    wrapped = {name: ScaleTrainableLinear(m) for name, m in model.named_modules()
               if isinstance(m, QuantLinear) and isinstance(m.qweight.scheme, IntGrid) and m.qweight.zeros is not None
               and type(m).__name__ == "QuantLinear"}
    if not wrapped:
        return []
    losses: list[float] = []
    with _trained_in_place(model, wrapped, lambda name, layer: replace_module(model, name, layer.finish())):
        optimizer = torch.optim.Adam([layer.log_scale for layer in wrapped.values()], lr=lr)
        order = torch.randperm(batches.shape[0], generator=torch.Generator().manual_seed(seed))
        per_step = max(1, batches.shape[0] // max(steps, 1))
        for step in tqdm(range(steps), desc="qat scales", disable=not progress):
            ids = batches[order[(step * per_step + torch.arange(per_step)) % batches.shape[0]]]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            losses.append(_optimizer_step(optimizer, [lr], loss, step, steps))
    return losses


@contextlib.contextmanager
def _trained_in_place(model: nn.Module, replacements: dict[str, nn.Module], finish: Any):
    """The model frozen, `replacements` (modules whose own parameters train) installed under their names and the
    model in training mode; on exit, even on error: eval mode, finish(name, module) for each replacement (putting
    a quantized layer back) and every parameter's requires_grad as it was."""
    from lowbit.runtime.surgery import replace_module

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    for name, module in replacements.items():
        replace_module(model, name, module)
    model.train()
    try:
        yield
    finally:
        model.eval()
        for name, module in replacements.items():
            finish(name, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _optimizer_step(optimizer: torch.optim.Optimizer, base_lrs: list[float], loss: torch.Tensor, step: int,
                    steps: int) -> float:
    """One cosine-scheduled optimizer step on `loss`; returns the loss's value."""
    cosine(optimizer, base_lrs, step, steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def distill_merged(model: nn.Module, teacher: nn.Module, batches: torch.Tensor, layers: Any, steps: int,
                   lr: float = 1e-2, scale_lr: float = 1e-3, chunk: int = 8, seed: int = 0,
                   progress: bool = False) -> list[float]:
    """End-to-end quantization-aware training of the re-quantized `layers` of `model` towards `teacher` (the
    float merged model): each such QuantLinear on an affine grid becomes a FakeQuantLinear (a latent float
    weight starting at its dequantized codes, its statistics learnable for integer grids, straight-through
    rounding), the loss is the KL divergence of the model's next-token distribution from the teacher's on
    `chunk` windows of `batches` per step (cycling, seeded), and the codes are chosen anew on the learned
    statistics at the end. Layer-wise re-quantization (GPTQ, block QAT) matches each layer or block on its own;
    this matches what the adapter changed, the whole model's output, so the rounding errors of all layers
    compensate one another. Memory: a float copy of the trained layers and Adam's two states for them."""
    from tqdm.auto import tqdm

    from lowbit.runtime.surgery import install_quantized
    from lowbit.schemes.base import KeptGrid

    modules = dict(model.named_modules())
    fakes: dict[str, FakeQuantLinear] = {}
    for name in layers:
        module = modules.get(name)
        if not isinstance(module, QuantLinear) or module.qweight.zeros is None:
            continue
        qweight = module.qweight
        fakes[name] = FakeQuantLinear(qweight.dequantize(), module.bias,
                                      fake_quantizer(KeptGrid(qweight), qweight.dequantize()))
    if not fakes:
        return []
    losses: list[float] = []
    finish = lambda name, fake: install_quantized(model, name, fake.quantizer.finish(fake.weight.detach()))  # noqa: E731
    with _trained_in_place(model, fakes, finish):
        optimizer = qat_optimizer(fakes.values(), lr, scale_lr)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        order = torch.randperm(batches.shape[0], generator=torch.Generator().manual_seed(seed))
        teacher.eval()
        for step in tqdm(range(steps), desc="merge distill", disable=not progress):
            ids = batches[order[(step * chunk + torch.arange(chunk)) % batches.shape[0]]]
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.kl_div(F.log_softmax(logits, dim=-1).flatten(0, -2), target.flatten(0, -2),
                            log_target=True, reduction="batchmean")
            losses.append(_optimizer_step(optimizer, base_lrs, loss, step, steps))
    return losses
