"""Quantization-aware training, block by block (issue 14): fake quantization with straight-through gradients and
learnable scales, as the method `qat` of the one block walk (`lowbit.methods.pipeline.walk`).

For each decoder block (EfficientQAT's Block-AP, with LSQ's scale gradients): the float block's outputs on the
block's calibration inputs are the target; every Linear of the block becomes a `FakeQuantLinear` holding a
trainable float copy of its weight (one block's worth of memory) and its trainable statistics; the block's
output error (MSE) is minimised with Adam over the calibration windows for `epochs` passes; the weight then
gets its final codes on the learned statistics, a normal `QuantizedWeight` every format writes. The walk feeds
each block the outputs of the already-quantized blocks before it, as it does for GPTQ.

Where training starts (`init`): "gptq" runs GPTQ on the block's calibration inputs first and starts from its
codes (the latent weight is the float weight moved into GPTQ's rounding bins, `within_codes`, so step 0 is
GPTQ's block exactly); "rtn" starts from rounding on the MSE-clipped grid. With `keep_best` (default) the last
eighth of the calibration windows is held out from training, and each block keeps whichever codes have the lower
block output error on them: the trained ones, the start's, or GPTQ's (computed for init="rtn" too), so a block
never ends worse than GPTQ on those windows. The block error is a local judge (a block whose error drops there
can still cost the model perplexity): with select="model" (default), after the walk each block that kept its
trained codes over GPTQ's gets GPTQ's back unless the model's loss on the held-out windows is lower with
the trained ones (`QAT.after_block`, before the block calibrates the next ones; in-memory walks only). nf4/fp4 layers have no GPTQ (no column-wise codebook encode) and
start from their absmax either way.

Fake quantization per scheme (`fake_quantizer`):
- integer grids (IntGrid, any bits and groups): w_q = s * (clamp(round(w / s) + z, 0, maxq) - z) with s learned
  per group in log space; round() passes gradients straight through, so d w_q / d s = q - w / s inside the
  grid (LSQ) and d w_q / d w = 1 inside it, 0 where clamped.
- NF4/FP4 (bitsandbytes' 4-bit codebooks): w_q = a * table[nearest(w / a)] with the block absmax a learned the
  same way; double quantization compresses the learned absmax at the end and the codes are chosen under it.
- GGUF block types (Q4_0, Q4_K, ... any type): the statistics llama.cpp's quantizer fits stay fixed (they are
  stored quantized inside the blocks); the weights are learned under them and re-encoded into the same blocks.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import CALIBRATION_OPTION_TYPES, BlockResult, Method, join_name, register_method
from lowbit.methods.gptq import resolve_scheme
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import KeptGrid, Scheme, expand_groups
from lowbit.schemes.codebook import Codebook4, _bucketing
from lowbit.schemes.ggml import GGMLScheme
from lowbit.schemes.intgrid import _SCALE_DTYPES, IntGrid

log = logging.getLogger("lowbit")


class FakeQuantizer(nn.Module):
    """The learnable statistics of one weight and its differentiable fake quantization."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, weight: torch.Tensor) -> QuantizedWeight:
        """The final codes of `weight` on the learned statistics."""
        raise NotImplementedError


class AffineFake(FakeQuantizer):
    """w = s * (q - z) grids (IntGrid; GGUF types in their affine view, with fixed statistics), starting from the
    codes and statistics of `initial`."""

    def __init__(self, initial: QuantizedWeight, learn_scales: bool):
        super().__init__()
        scheme = initial.scheme
        self.scheme = scheme
        self.initial = initial
        self.group_index = initial.group_index()
        scales = initial.scales.float()
        # llama.cpp's symmetric types (Q4_0, Q8_0, ...) store d = max / -8: negative scales are part of the grid
        self.register_buffer("sign", torch.where(scales < 0, -1.0, 1.0))
        self.log_scale = nn.Parameter(scales.abs().clamp(min=1e-12).log(), requires_grad=learn_scales)
        self.register_buffer("zeros", initial.zeros.float())

    def scales(self) -> torch.Tensor:
        return self.sign * self.log_scale.exp()

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        return expand_groups(self.scales(), self.group_index), expand_groups(self.zeros, self.group_index)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scheme.fake_quantize_ste(weight, *self._columns())

    @torch.no_grad()
    def finish(self, weight: torch.Tensor) -> QuantizedWeight:
        if isinstance(self.scheme, GGMLScheme):
            s, z = self._columns()
            return self.scheme.with_codes(self.initial, self.scheme.encode(weight, s, z))
        scales = self.scales().to(_SCALE_DTYPES[self.scheme.scale_dtype]).float()
        s, z = expand_groups(scales, self.group_index), expand_groups(self.zeros, self.group_index)
        return dataclasses.replace(self.initial, codes=self.scheme.encode(weight, s, z), scales=scales)


class CodebookFake(FakeQuantizer):
    """NF4/FP4: w = a * table[code] per flat block of `blocksize`, a learned (log space)."""

    def __init__(self, scheme: Codebook4, weight: torch.Tensor):
        super().__init__()
        self.scheme = scheme
        self.shape = tuple(weight.shape)
        initial = scheme.quantize(weight)
        absmax = initial.scales.reshape(-1).float().clamp(min=1e-12)
        self.log_absmax = nn.Parameter(absmax.log())
        values, _ = torch.sort(scheme.table(), stable=True)
        midpoints, order = _bucketing(scheme.quant_type)
        self.register_buffer("sorted_values", values)
        self.register_buffer("midpoints", midpoints)
        self.register_buffer("order", order)

    def _per_value(self, absmax: torch.Tensor) -> torch.Tensor:
        return absmax.repeat_interleave(self.scheme.blocksize)[: math.prod(self.shape)]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a = self._per_value(self.log_absmax.exp())
        v = torch.clamp(weight.reshape(-1) / a, -1, 1)
        nearest = self.sorted_values[torch.bucketize(v.detach(), self.midpoints)]
        return (a * (v + (nearest - v).detach())).reshape(self.shape)

    @torch.no_grad()
    def finish(self, weight: torch.Tensor) -> QuantizedWeight:
        absmax = self.log_absmax.exp()
        extra: dict[str, torch.Tensor] = {}
        if self.scheme.double_quant:
            extra = self.scheme.compress_absmax(absmax)
            absmax = self.scheme.nested_absmax_values(extra)
        v = torch.clamp(weight.reshape(-1) / self._per_value(absmax), -1, 1)
        codes = self.order[torch.bucketize(v, self.midpoints)].reshape(self.shape)
        return QuantizedWeight(self.scheme, self.shape, codes=codes,
                               scales=self.scheme._scales_layout(absmax, self.shape), zeros=None,
                               group_size=self.scheme.blocksize, extra=extra)


def fake_quantizer(scheme: Scheme, weight: torch.Tensor, start: QuantizedWeight | None = None) -> FakeQuantizer:
    """The fake quantizer of `weight` on `scheme`, its statistics starting from `start` (codes some other method
    chose on this grid, e.g. GPTQ's) when given, else from the scheme's own rounding."""
    if isinstance(scheme, IntGrid):
        if start is None:
            # start from the MSE-clipped grid (what RTN --clip-search picks): at 2-3 bits absmax wastes levels
            start = dataclasses.replace(scheme, clip_search=True).quantize(weight)
            start.scheme = scheme
        return AffineFake(start, learn_scales=True)
    if isinstance(scheme, Codebook4):
        return CodebookFake(scheme, weight)
    if isinstance(scheme, KeptGrid):      # merge: the base's statistics as the start (learned for integer grids)
        return AffineFake(start or scheme.quantize(weight), learn_scales=isinstance(scheme.base.scheme, IntGrid))
    if isinstance(scheme, GGMLScheme):
        return AffineFake(start or scheme.quantize(weight), learn_scales=False)
    raise LowbitError(f"qat does not support scheme {scheme.name}; use an integer grid, nf4/fp4 or a GGUF type")


def within_codes(weight: torch.Tensor, start: QuantizedWeight) -> torch.Tensor:
    """`weight` moved into the rounding bins of `start`'s codes: their value plus the weight's offset from it,
    clipped to just inside half a step. The fake quantization then gives exactly `start`'s block, and the latent
    weights sit where the float weights pull them rather than at the bin centres, where no code could move in
    the first steps of training (the float weight's side of the bin is what GPTQ's compensation traded)."""
    value = start.dequantize().float()
    half_step = 0.499 * expand_groups(start.scales.float(), start.group_index()).abs()
    return value + torch.maximum(torch.minimum(weight - value, half_step), -half_step)


class FakeQuantLinear(nn.Module):
    """A Linear computing with the fake-quantized value of its trainable float weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantizer: FakeQuantizer):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantizer(self.weight).to(x.dtype), self.bias)


def qat_optimizer(fakes: Any, lr: float, scale_lr: float) -> torch.optim.Adam:
    """Adam over the fake-quantized layers' latent weights and learnable statistics."""
    groups = []
    for fake in fakes:
        # step sizes relative to the weight's own size: one lr fits layers and models of any scale
        groups.append({"params": [fake.weight], "lr": lr * fake.weight.detach().pow(2).mean().sqrt().item()})
        stats = [p for p in fake.quantizer.parameters() if p.requires_grad]
        if stats:
            groups.append({"params": stats, "lr": scale_lr})
    return torch.optim.Adam(groups)


def cosine(optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int, total: int) -> None:
    """Set each group's lr on a cosine from its base lr to 0 over `total` steps."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / total))


@dataclass
class QATReport:
    """Block output error (MSE relative to the target's mean square) of the codes kept, of the start, and of the
    trained codes, on the windows the choice was made on (held out from training when there are >= 2 calls);
    `kept` says which codes the block got: "trained", "start" or "gptq" (keep_best, when training did not help)."""

    relative_error: float
    initial_error: float
    trained_error: float = float("nan")
    kept: str = "trained"


# where the fake quantization starts: GPTQ's codes (run on the same calibration inputs first) or rounding to
# nearest on the MSE-clipped grid; nf4/fp4 layers start from their absmax in both (GPTQ has no codebook encode)
QAT_INITS = ("gptq", "rtn")      # also lowbit.training.config.QAT_INITS
# how keep_best chooses: on the held-out block error only, or then also on the whole model's held-out loss
QAT_SELECTS = ("model", "block")


def selection_split(n_calls: int) -> tuple[list[int], list[int]]:
    """(training, selection) call indices: the last eighth of the calibration calls (at least one) is held out
    to choose among the trained, the starting and GPTQ's codes; a single call is used for both."""
    if n_calls < 2:
        return list(range(n_calls)), list(range(n_calls))
    held = max(1, n_calls // 8)
    return list(range(n_calls - held)), list(range(n_calls - held, n_calls))


def scheme_from_name(name: str, bits: int, group_size: int, symmetric: bool = True) -> Scheme:
    """int (IntGrid with bits/group_size), nf4 / fp4 (double quantized, blocksize 64), or a GGUF type name."""
    key = name.lower()
    if key == "int":
        return IntGrid(bits=bits, group_size=group_size, symmetric=symmetric)
    if key in ("nf4", "fp4"):
        return Codebook4(quant_type=key, blocksize=64, double_quant=True, compute_dtype="float32")
    return GGMLScheme(type=name.upper())


@register_method
class QAT(Method):
    """Block-wise quantization-aware training (see the module docstring)."""

    name = "qat"
    needs_calibration = True
    # chunk: calibration windows per recorded call, 8 as GPTQ's, so the GPTQ codes computed here are exactly
    # GPTQ's own (its Hessians and the next blocks' inputs depend on the grouping through float rounding, and
    # at 4 bits that rounding alone moves perplexity by ~1%); Adam still steps once per window (split_windows)
    # min_gain: the relative held-out improvement the trained codes need to replace the start's or GPTQ's
    # (a few held-out windows are a noisy judge: a block whose error drops by 1% there can still cost perplexity)
    # select (keep_best): "block" keeps whichever codes have the lower held-out block error; "model" then checks
    # each block that kept its trained codes over GPTQ's on the whole model's held-out loss (see after_block)
    defaults = {"epochs": 4, "lr": 1e-2, "scale_lr": 1e-2, "chunk": 8, "init": "gptq", "keep_best": True,
                "min_gain": 0.0, "select": "model"}
    option_types = {"epochs": int, "lr": float, "scale_lr": float, "init": str, "keep_best": bool, "min_gain": float,
                    "select": str, **CALIBRATION_OPTION_TYPES}

    def __init__(self, config: Any):
        super().__init__(config)
        if self.option("epochs") < 1 or self.option("chunk") < 1:
            raise LowbitError(f"method qat: epochs and chunk must be >= 1 (got {self.option('epochs')}, "
                              f"{self.option('chunk')})")
        if not self.option("lr") > 0 or self.option("scale_lr") < 0:
            raise LowbitError(f"method qat: lr must be > 0 and scale_lr >= 0 (got {self.option('lr')}, "
                              f"{self.option('scale_lr')})")
        if not 0 <= self.option("min_gain") < 1:
            raise LowbitError(f"method qat: min_gain must be in [0, 1) (got {self.option('min_gain')})")
        if self.option("init") not in QAT_INITS:
            raise LowbitError(f"method qat: init must be one of {', '.join(QAT_INITS)} (got {self.option('init')!r})")
        if self.option("select") not in QAT_SELECTS:
            raise LowbitError(f"method qat: select must be one of {', '.join(QAT_SELECTS)} "
                              f"(got {self.option('select')!r})")
        # block prefix -> GPTQ's codes (and block error) of a block that kept its trained codes over them
        # (select="model"), held from the block's quantization until after_block has judged it on the model
        self.gptq_alternatives: dict[str, tuple[dict[str, QuantizedWeight], float]] = {}

    def option_names(self) -> tuple[str, ...]:
        return ("scheme", "epochs", "lr", "scale_lr", "init", "keep_best", "min_gain", "select", "calib_samples",
                "calib_len", "seed", "chunk")

    def option(self, key: str) -> Any:
        value = self.config.options.get(key)
        return self.defaults.get(key) if value is None else value

    def scheme(self) -> Scheme:
        c = self.config
        scheme = c.options.get("scheme")
        if isinstance(scheme, str):
            return scheme_from_name(scheme, c.bits, c.group_size, c.symmetric)
        return resolve_scheme(scheme, IntGrid(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric))

    def check_layer(self, name: str, linear: nn.Module) -> None:
        from lowbit.models.adapters import in_out_features

        scheme = self.scheme_for(name)
        k = in_out_features(linear)[0]
        if isinstance(scheme, GGMLScheme) and k % scheme.codec.block:
            raise LowbitError(f"{name}: {scheme.type} needs a width that is a multiple of {scheme.codec.block}, "
                              f"got {k}; pick another type or skip the layer")
        super().check_layer(name, linear)

    def gptq_start(self, block: nn.Module, linears: dict[str, nn.Module], calls: list, arch: Any,
                   prefix: str) -> dict[str, QuantizedWeight]:
        """GPTQ's codes for the block's Linears on its grid (not nf4/fp4 ones), on the same calibration calls.
        GPTQ overwrites the block's float weights with its dequantized codes as it goes (true sequential)."""
        from lowbit.methods.base import QuantizeConfig
        from lowbit.methods.gptq import GPTQ

        c = self.config
        gptq = GPTQ(QuantizeConfig(method="gptq", bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                                   clip_search=c.clip_search, skip=c.skip))
        gptq.scheme = self.scheme          # the same grid, per-layer plans included
        gptq.layer_schemes = self.layer_schemes
        supported = {name: m for name, m in linears.items()
                     if not isinstance(self.scheme_for(join_name(prefix, name)), Codebook4)}
        return gptq.quantize_block(block, supported, calls, arch, prefix).weights if supported else {}

    def quantize_block(self, block: nn.Module, linears: dict[str, nn.Module], inputs: Any = None,
                       arch: Any = None, prefix: str = "") -> BlockResult:
        from lowbit.calibration.capture import block_output, run_block, split_windows
        from lowbit.models.arch.base import linear_weight
        from lowbit.runtime.surgery import replace_module

        if inputs is None:
            raise LowbitError("qat needs calibration inputs for every block")
        recorded = list(inputs)
        calls = [window for call in recorded for window in split_windows(call)]
        targets = [call.hidden for call in run_block(block, calls)]
        keep_best = self.option("keep_best")
        training, selection = selection_split(len(calls)) if keep_best else (list(range(len(calls))), [])
        weights = {name: linear_weight(module).detach().float().clone() for name, module in linears.items()}
        init = self.option("init")
        gptq = self.gptq_start(block, linears, recorded, arch, prefix) if init == "gptq" or keep_best else {}
        starts = gptq if init == "gptq" else {}
        frozen = {p: p.requires_grad for p in block.parameters()}
        for p in frozen:
            p.requires_grad_(False)
        fakes: dict[str, FakeQuantLinear] = {}
        for name, module in linears.items():
            start = starts.get(name)
            latent = weights[name] if start is None else within_codes(weights[name], start)
            fakes[name] = FakeQuantLinear(latent, getattr(module, "bias", None),
                                          fake_quantizer(self.scheme_for(join_name(prefix, name)), weights[name],
                                                         start))
            replace_module(block, name, fakes[name])
        try:
            optimizer = qat_optimizer(fakes.values(), self.option("lr"), self.option("scale_lr"))
            generator = torch.Generator().manual_seed(self.option("seed") or 0)
            epochs = self.option("epochs")

            def block_error(indices: list[int]) -> float:
                with torch.no_grad():
                    num = sum(F.mse_loss(block_output(block(*calls[i].args, **calls[i].kwargs)), targets[i],
                                         reduction="sum").item() for i in indices)
                    return num / sum(targets[i].pow(2).sum().item() for i in indices)

            judged = selection or training
            initial = block_error(judged)
            start_codes = {name: starts.get(name) or fake.quantizer.finish(fake.weight.detach())
                           for name, fake in fakes.items()}
            total = epochs * len(training)
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            step = 0
            for _ in range(epochs):
                for j in torch.randperm(len(training), generator=generator).tolist():
                    cosine(optimizer, base_lrs, step, total)
                    call = calls[training[j]]
                    out = block_output(block(*call.args, **call.kwargs))
                    loss = F.mse_loss(out, targets[training[j]])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
            trained = block_error(judged)
            candidates = {"trained": ({name: fake.quantizer.finish(fake.weight.detach())
                                       for name, fake in fakes.items()}, trained)}
            if keep_best:
                candidates["start"] = (start_codes, initial)
                if init != "gptq" and gptq:     # GPTQ's codes (nf4/fp4 layers: the start's) judged too
                    for name, fake in fakes.items():
                        fake.quantizer = fake_quantizer(self.scheme_for(join_name(prefix, name)), weights[name],
                                                        gptq.get(name))
                        fake.weight.data = (weights[name] if name not in gptq else gptq[name].dequantize()).float()
                    candidates["gptq"] = ({name: gptq.get(name) or start_codes[name] for name in fakes},
                                          block_error(judged))
        finally:
            for name, module in linears.items():
                replace_module(block, name, module)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        handicap = {"trained": 1 / (1 - self.option("min_gain"))}
        kept = min(candidates, key=lambda k: (candidates[k][1] * handicap.get(k, 1), k != "trained"))
        report = QATReport(relative_error=candidates[kept][1], initial_error=initial, trained_error=trained,
                           kept=kept)
        log.debug("qat %s: block error %.3e -> %.3e, kept the %s codes", prefix, initial, trained, kept)
        gptq_name = "gptq" if "gptq" in candidates else "start" if init == "gptq" else None
        if kept == "trained" and gptq_name in candidates and self.option("select") == "model":
            self.gptq_alternatives[prefix] = candidates[gptq_name]
        return BlockResult(candidates[kept][0], {name: report for name in fakes})

    def after_block(self, model: nn.Module | None, block: nn.Module, prefix: str, batch: Any,
                    result: BlockResult) -> BlockResult:
        """select="model": the held-out block error is a local judge (a block whose error drops there can still
        cost the model perplexity), so a block that kept its trained codes over GPTQ's gets GPTQ's back unless
        the model's loss on the held-out calibration windows (blocks before quantized, blocks after float) is
        lower with the trained ones. Judged here, before the block's outputs calibrate the next blocks, so these
        are calibrated on the codes the block ends with."""
        alternative = self.gptq_alternatives.pop(prefix, None)
        if alternative is None:
            return result
        if model is None:
            log.info("qat: select=model needs the model in memory; a streamed walk keeps the block-wise choice")
            return result
        from lowbit.runtime.surgery import install_quantized, replace_module

        codes, block_error = alternative
        held_out = [batch[i:i + 1] for i in selection_split(batch.shape[0])[1]]   # quantize_block's windows
        with_trained = heldout_loss(model, held_out)
        trained = {name: block.get_submodule(name) for name in codes}
        for name, qw in codes.items():
            install_quantized(block, name, qw, "reference")
        with_gptq = heldout_loss(model, held_out)
        log.info("qat %s: held-out model loss %.4f with the trained codes, %.4f with GPTQ's: kept %s", prefix,
                 with_trained, with_gptq, "GPTQ's" if with_gptq <= with_trained else "the trained")
        if with_gptq > with_trained:
            for name, module in trained.items():
                replace_module(block, name, module)
            return result
        return BlockResult(codes, {name: dataclasses.replace(report, relative_error=block_error, kept="gptq")
                                   for name, report in result.reports.items()})


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: list[torch.Tensor]) -> float:
    """The model's mean next-token cross-entropy over the token windows (one forward each)."""
    total, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count
