"""AWQ: protect the input channels that carry large activations by scaling them up before rounding.

For Linears sharing an input x (q/k/v after the attention norm, gate/up after the MLP norm, ...), AWQ
multiplies weight column j by s_j and divides the op producing x by s_j, which leaves the float model
unchanged but makes rounding error on salient channels s_j times smaller relative to them. The scales are
s = mean|x|^alpha / mean|w~|^(1-alpha) (w~: weights normalised per group), alpha picked on a grid to
minimise the output error of the module that consumes x (the attention or MLP), as in Lin et al., 2023
and AutoAWQ; no scaling at all is a candidate too, so the search never does worse than plain rounding
on its calibration tokens. Each candidate costs a forward pass of that module over the search tokens, which is
most of AWQ's time on CPU, so by default the grid is searched coarse to fine (`alpha_search="refine"`: every
4th point, then the neighbours of the best at half the step, then at the grid's step: 10 passes instead of 21,
the same point whenever the error is unimodal in alpha); `alpha_search="grid"` tries every point as AutoAWQ. The 1/s is folded into the preceding RMSNorm/LayerNorm weight or the rows of the preceding
Linear (`Architecture.scale_groups`). Then a clip search shrinks each group's range to minimise the Linear's
output error, and the clipped weights are rounded to the integer grid (with a zero point by default).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.calibration.capture import block_output, collect_inputs, first_input, flat_tokens
from lowbit.errors import LowbitError
from lowbit.methods.base import CALIBRATION_OPTION_TYPES, BlockResult, register_method
from lowbit.methods.gptq import CalibratedMethod, set_linear_weight
from lowbit.models.arch.base import Architecture
from lowbit.models.arch.base import EXPERT, Fold, NormKind, ScaleGroup, expand_experts, is_expert_linear, is_linear, linear_weight
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.intgrid import IntGrid

log = logging.getLogger("lowbit")

DEFAULT_ALPHA_GRID = 20
ALPHA_SEARCHES = ("refine", "grid")
REFINE_FIRST_STRIDE = 4   # the coarse pass tries every 4th grid point; two halvings reach the grid's step
DEFAULT_CLIP_GRID = 20
DEFAULT_CLIP_MAX_SHRINK = 0.5
DEFAULT_CLIP_TOKENS = 512
# Tokens the alpha search runs the inspected module on: each of the grid's points is a forward pass, which on
# CPU dominates AWQ's cost; channel magnitudes still use every calibration token.
DEFAULT_SEARCH_TOKENS = 4096
# Tokens the per-Linear output error (progress bar, reports) is measured on.
REPORT_TOKENS = 4096


@dataclass
class AWQReport:
    """Per-Linear outcome: the chosen alpha of its scale group (None if unscaled) and its output error."""

    alpha: float | None    # None: left unscaled (no foldable op, or no scaling beat plain rounding)
    relative_error: float


def padded_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[R, K] -> [R, G, g] with a short last group padded by zeros (which change no |max| and no product)."""
    r, k = t.shape
    g = k if group_size <= 0 else group_size
    pad = (-k) % g
    if pad:
        t = torch.cat([t, t.new_zeros(r, pad)], dim=1)
    return t.reshape(r, -1, g)


def weight_salience(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """mean over output rows of |w| normalised by its group's max |w|: [K], AWQ's per-channel weight size."""
    w = torch.cat([x.float() for x in weights], dim=0)
    n, k = w.shape
    grouped = padded_groups(w.abs(), group_size)
    grouped = grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return grouped.reshape(n, -1)[:, :k].mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x_mean^alpha / w_mean^(1 - alpha), normalised so that max*min = 1 (as AutoAWQ)."""
    s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.nan_to_num(s, nan=1.0, posinf=1.0, neginf=1.0)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor, fold: Fold = Fold.NORM,
                companions: tuple[nn.Module, ...] = ()) -> None:
    """Divide the output of `prev` by `scales` and multiply the input columns of the linears (and of float
    companions reading the same input, such as an MoE router) by them: the float model is unchanged."""
    n = scales.numel()
    if fold is Fold.NORM and is_linear(prev):
        fold = Fold.LINEAR
    if fold in (Fold.LINEAR, Fold.LINEAR_LAST_ROWS):
        w = linear_weight(prev).clone()
        w[-n:] = w[-n:] / scales.view(-1, 1)   # Fold.LINEAR: the last n rows are all rows
        set_linear_weight(prev, w)
    elif fold is Fold.NORM_PLUS_ONE:  # Gemma: y = x_hat * (1 + w), so 1 + w' = (1 + w) / s
        prev.weight.copy_((1 + prev.weight) / scales - 1)
    else:  # y = x_hat * w (+ b)
        prev.weight.div_(scales)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias[-n:] = bias[-n:] / scales
    for lin in linears:
        set_linear_weight(lin, linear_weight(lin) * scales.view(1, -1))
    for module in companions:
        module.weight.mul_(scales.view(1, -1))


def can_fold(prev: nn.Module | None, linears: list[nn.Module], fold: Fold = Fold.NORM, parts: int = 1) -> bool:
    """Whether 1/s can be folded into `prev`: its output width must equal the linears' input width (for a
    fused Linear folded in its last rows, `parts` equal parts of that width)."""
    if prev is None:
        return False
    k = linear_weight(linears[0]).shape[1]
    if fold is Fold.LINEAR_LAST_ROWS:
        return is_linear(prev) and linear_weight(prev).shape[0] == parts * k
    if is_linear(prev):
        return linear_weight(prev).shape[0] == k
    weight = getattr(prev, "weight", None)
    return weight is not None and weight.dim() == 1 and weight.numel() == k


def block_scale_groups(block: nn.Module, arch: Architecture) -> list[ScaleGroup]:
    """The architecture's scale groups for this block, `{e}` templates expanded over its experts, and a norm
    fold made the (1 + w) fold in families whose norms scale by 1 + w (Gemma)."""
    import dataclasses

    out = []
    for group in arch.scale_groups:
        if group.fold is Fold.NORM and arch.norm is NormKind.RMS_PLUS_ONE:
            group = dataclasses.replace(group, fold=Fold.NORM_PLUS_ONE)
        if EXPERT in group.prev:
            for e in range(len(expand_experts((group.prev,), block, arch))):
                out.append(dataclasses.replace(group, prev=group.prev.format(e=e), inspect=group.inspect.format(e=e),
                                               linears=tuple(n.format(e=e) for n in group.linears)))
        else:
            out.append(dataclasses.replace(group, linears=expand_experts(group.linears, block, arch)))
    return out


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def search_alpha_grid(n_grid: int, search: str, loss_of_step: Callable[[int], float]) -> tuple[int, float]:
    """The grid step (alpha = step / n_grid, 0 <= step < n_grid) of least loss and its loss; ties go to the
    smaller step. "grid" evaluates every step; "refine" evaluates every REFINE_FIRST_STRIDE-th step, then the
    neighbours of the best at half that stride, and so on down to stride 1, which finds the grid's minimum
    whenever the loss is unimodal along the grid, in about a third of the evaluations when n_grid = 20."""
    if n_grid < 1:
        raise LowbitError(f"AWQ alpha_grid must be >= 1 (got {n_grid})")
    losses: dict[int, float] = {}

    def best_of(steps) -> int:
        for step in steps:
            if 0 <= step < n_grid and step not in losses:
                losses[step] = loss_of_step(step)
        return min(losses, key=lambda step: (losses[step], step))

    if search == "grid":
        best = best_of(range(n_grid))
    else:
        stride = min(REFINE_FIRST_STRIDE, n_grid)
        best = best_of(range(0, n_grid, stride))
        while stride > 1:
            stride //= 2
            best = best_of((best - stride, best + stride))
    return best, losses[best]


@torch.no_grad()
def clip_ranges(weight: torch.Tensor, x: torch.Tensor, scheme: IntGrid, n_grid: int = DEFAULT_CLIP_GRID,
                max_shrink: float = DEFAULT_CLIP_MAX_SHRINK) -> torch.Tensor:
    """Per-(row, group) clip bound |w| <= bound minimising the group's output error on tokens x [T, K]."""
    w = weight.float()
    n, k = w.shape
    wg = padded_groups(w, scheme.group_size)                       # [N, G, g]
    xg = padded_groups(x.float(), scheme.group_size).transpose(0, 1)  # [G, T, g]
    reference = torch.bmm(xg, wg.permute(1, 2, 0))                 # [G, T, N]
    # One buffer for every candidate's outputs and errors, worked in place: tokens x N floats per step (70 MB for
    # a 4864-wide Linear), not three fresh allocations whose pages are zeroed each time.
    out = torch.empty_like(reference)
    original_max = wg.abs().amax(dim=-1)                           # [N, G]
    best_bound = original_max.clone()
    best_err = torch.full_like(original_max, float("inf"))
    for step in range(int(max_shrink * n_grid)):
        bound = original_max * (1 - step / n_grid)
        clipped = torch.maximum(torch.minimum(wg, bound.unsqueeze(-1)), -bound.unsqueeze(-1))
        q = padded_groups(scheme.fake_quantize(clipped.reshape(n, -1)[:, :k]), scheme.group_size)
        torch.bmm(xg, q.permute(1, 2, 0), out=out)
        err = out.sub_(reference).pow_(2).mean(dim=1).t()          # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound


def apply_clip(weight: torch.Tensor, bound: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each group of `weight` [N, K] to [-bound, bound] (bound [N, G])."""
    n, k = weight.shape
    b = bound.unsqueeze(-1)
    return torch.maximum(torch.minimum(padded_groups(weight.float(), group_size), b), -b).reshape(n, -1)[:, :k]


def output_error(x: torch.Tensor, weight: torch.Tensor, qw: QuantizedWeight) -> float:
    """||x Q^T - x W^T||^2 / ||x W^T||^2 for tokens x [T, K]: a Linear's relative output error, as reported."""
    ref = x @ weight.t()
    return ((x @ qw.dequantize().t() - ref).norm() / ref.norm().clamp(min=1e-12)).item() ** 2


class InspectedInputs:
    """What the inspected module receives: mean |x| per channel over every calibration token, and the leading
    calls holding about `budget` tokens (at least one), which the alpha search replays. Other calls are not
    kept, so memory does not grow with the calibration set."""

    def __init__(self, budget: int):
        self.budget = budget
        self.search_calls: list[tuple[tuple, dict]] = []
        self.kept_tokens = 0
        self.abs_sum: torch.Tensor | float = 0.0
        self.n_tokens = 0

    def add(self, _name: str, args: tuple, kwargs: dict) -> None:
        x = flat_tokens(first_input(args, kwargs))
        self.abs_sum = self.abs_sum + x.abs().sum(0)
        self.n_tokens += x.shape[0]
        if not self.search_calls or self.kept_tokens < self.budget:
            self.search_calls.append((args, kwargs))
            self.kept_tokens += x.shape[0]

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.n_tokens


@register_method
class AWQ(CalibratedMethod):
    """Activation-aware weight quantization on CPU (see the module docstring)."""

    name = "awq"
    uses_layer_schemes = False
    option_types = {"zero_point": bool, "alpha_grid": int, "alpha_search": str, "clip": bool, "clip_grid": int,
                    "clip_tokens": int, "search_tokens": int, **CALIBRATION_OPTION_TYPES}

    def option_names(self) -> tuple[str, ...]:
        return ("zero_point", "alpha_grid", "alpha_search", "clip", "clip_grid", "clip_tokens", "search_tokens",
                "calib_samples",
                "calib_len", "seed", "chunk")

    def scheme(self) -> IntGrid:
        """AWQ's grid: asymmetric (zero point) unless zero_point=False; no MSE clip (AWQ searches its own)."""
        c = self.config
        return IntGrid(bits=c.bits, group_size=c.group_size, symmetric=not self.option("zero_point", True))

    @torch.no_grad()
    def quantize_block(self, block: nn.Module, linears: dict[str, nn.Module], inputs: Any = None,
                       arch: Architecture | None = None, prefix: str = "") -> BlockResult:
        """Scale search + fold (per `arch.scale_groups`), clip search and rounding for one block's Linears.

        The folds change the block's float modules (norms, preceding Linears, routers) without changing what the
        float block computes; the codes and reports are returned, not installed."""
        if inputs is None:
            raise LowbitError("AWQ needs calibration inputs for every block")
        scheme = self.scheme()
        if self.option("alpha_search", "refine") not in ALPHA_SEARCHES:
            raise LowbitError(f"AWQ alpha_search must be one of {', '.join(ALPHA_SEARCHES)} "
                              f"(got {self.option('alpha_search')!r})")
        alphas: dict[str, float] = {}
        for group in (block_scale_groups(block, arch) if arch is not None else ()):
            names = [n for n in group.linears]
            if not group.prev or any(n not in linears for n in names):
                continue  # nothing to fold into, or a member is skipped (kept in float): leave it unscaled
            prev = _submodule(block, group.prev)
            inspect = _submodule(block, group.inspect) if group.inspect else block
            companions = tuple(_submodule(block, c) for c in group.companions)
            if prev is None or inspect is None or None in companions:
                continue  # the group belongs to another variant of the family (Falcon 7B vs 40B norms)
            members = [linears[n] for n in names]
            parts = len(arch.fused.get(group.prev, ())) or 1
            if not can_fold(prev, members, group.fold, parts):
                log.debug("AWQ %s: %s output width differs from %s inputs; not scaled", prefix, group.prev, names)
                continue
            inputs_seen = InspectedInputs(self.option("search_tokens", DEFAULT_SEARCH_TOKENS))
            watched = {"inspect": inspect}
            input_of = _submodule(block, group.input_of) if group.input_of else None
            magnitudes = InspectedInputs(0)
            if input_of is not None:
                watched["input"] = input_of
            expert_group = is_expert_linear(arch, group.inspect)
            collect_inputs(block, watched, inputs,
                           lambda key, a, kw: (inputs_seen if key == "inspect" else magnitudes).add(key, a, kw),
                           optional=set(watched) if expert_group else set())
            if inputs_seen.n_tokens == 0:
                continue  # an expert no calibration token was routed to: left unscaled
            x_mean = (magnitudes if input_of is not None else inputs_seen).abs_mean()
            w_mean = weight_salience([linear_weight(m) for m in members], scheme.group_size)
            search_calls = inputs_seen.search_calls
            reference = [block_output(inspect(*a, **kw)) for a, kw in search_calls]
            originals = [linear_weight(m).detach().clone() for m in members]
            n_grid = self.option("alpha_grid", DEFAULT_ALPHA_GRID)
            search = self.option("alpha_search", "refine")

            def scaled_loss(s: torch.Tensor) -> float:
                for module, w in zip(members, originals):
                    scaled = w.float() * s.view(1, -1)
                    set_linear_weight(module, scheme.fake_quantize(scaled) / s.view(1, -1))
                return sum((block_output(inspect(*a, **kw)) - ref).float().pow(2).sum().item()
                           for (a, kw), ref in zip(search_calls, reference))

            # No scaling at all (the original AWQ's alpha = 0) is tried first and kept unless a scale beats it.
            unscaled_loss = scaled_loss(torch.ones_like(x_mean))
            step, loss = search_alpha_grid(n_grid, search,
                                           lambda step: scaled_loss(awq_scales(x_mean, w_mean, step / n_grid)))
            best = ((loss, step / n_grid, awq_scales(x_mean, w_mean, step / n_grid)) if loss < unscaled_loss
                    else (unscaled_loss, None, None))
            for module, w in zip(members, originals):
                set_linear_weight(module, w)
            if best[1] is not None:
                fold_scales(prev, members, best[2], group.fold, companions)
                for n in names:
                    alphas[n] = best[1]
            del inputs_seen, search_calls, reference

        # Clip search and rounding on the scaled weights, with the inputs they now receive. Only every
        # stride-th token is kept: the clip search reads 512 of them and the error report a few thousand, and
        # keeping all would cost tokens x width floats per Linear (gigabytes for a 7B model's down_proj).
        clip = self.option("clip", True) and scheme.group_size != 0
        n_clip_tokens = self.option("clip_tokens", DEFAULT_CLIP_TOKENS)
        n_tokens = sum(call.hidden.shape[:-1].numel() for call in inputs)
        stride = max(1, n_tokens // max(n_clip_tokens, REPORT_TOKENS))
        samples: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        experts = {n for n in linears if arch is not None and is_expert_linear(arch, n)}
        collect_inputs(block, dict(linears), inputs,
                       lambda n, args, kwargs: samples[n].append(
                           flat_tokens(first_input(args, kwargs))[::stride].contiguous()),
                       stop_early=False, optional=experts)
        results: dict[str, QuantizedWeight] = {}
        reports: dict[str, AWQReport] = {}
        no_clip = arch.no_clip if arch is not None else ()
        for name, module in linears.items():
            w = linear_weight(module).detach().float()
            if not samples[name]:
                log.warning("AWQ: %s.%s received no calibration tokens (no token was routed to it); rounded to "
                            "nearest", prefix, name)
                samples.pop(name)
                results[name] = scheme.quantize(w)
                reports[name] = AWQReport(None, 0.0)
                continue
            x = torch.cat(samples.pop(name))
            if clip and name not in no_clip:
                step = max(1, x.shape[0] // n_clip_tokens)
                bound = clip_ranges(w, x[::step], scheme, self.option("clip_grid", DEFAULT_CLIP_GRID))
                qw = scheme.quantize(apply_clip(w, bound, scheme.group_size))
            else:
                qw = scheme.quantize(w)
            results[name] = qw
            error = output_error(x, w, qw)
            reports[name] = AWQReport(alphas.get(name), error)
        return BlockResult(results, reports)
