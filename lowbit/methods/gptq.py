"""GPTQ: choose codes column by column, pushing each column's rounding error onto the columns not yet quantized.

For a Linear with weight W [N, K] and calibration inputs X [tokens, K], GPTQ minimises ||W X^T - Q X^T||^2
using the Hessian H = 2 X^T X / tokens. Walking the columns in order, column k is rounded on the scheme's
grid, and its error e, divided by the k-th diagonal of the upper Cholesky factor of H^-1, is subtracted from
the remaining columns along that factor's row (the Optimal Brain Surgeon update). Updates are applied lazily
in blocks of 128 columns so most work is one matrix product per block (Frantar et al., 2022, Algorithm 1).

Options follow AutoGPTQ/GPTQModel: `damp` (fraction of mean(diag H) added to the diagonal; raised and
retried when H is not positive definite), `desc_act` (act-order: quantize columns by decreasing diag(H),
recording each column's group in g_idx), `static_groups` (fit every group's statistics from the original
weights before the sweep, so act-order keeps contiguous groups), `true_sequential` (within a block, calibrate
each Linear on inputs produced by the already-quantized Linears before it).

GPTQ works with any scheme that offers column-wise `encode`/`decode`: integer grids fit each group's scale
and zero as the sweep reaches it; other schemes (GGUF blocks) fix their statistics from the weights first
and GPTQ only re-chooses the codes (`scheme.with_codes` rebuilds what the scheme stores).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import CALIBRATION_OPTION_TYPES, BlockResult, Method, join_name, register_method
from lowbit.models.arch.base import Architecture
from lowbit.models.arch.base import expand_experts, is_expert_linear, linear_weight
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme, expand_groups, scheme_from_config
from lowbit.schemes.intgrid import IntGrid

log = logging.getLogger("lowbit")

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
MAX_DAMP_RETRIES = 6


class InputProducts:
    """X^T X (fp32 product, as fp64) of the latest input tensor, so Linears that read the very same tensor (q/k/v
    after one norm, gate/up) share one product instead of each computing it: the same GEMM on the same tensor,
    so every Hessian is bit-identical to accumulating it alone. A tensor changed in place since is recomputed.

    Only a weak reference to the input is kept (activations are freed when the forward pass is done with them),
    and the previous product is dropped before the next is computed, so at most one K x K product is alive, as
    when each Linear computed its own."""

    def __init__(self):
        self._input: weakref.ref | None = None
        self._version = -1
        self._product: torch.Tensor | None = None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self._input is None or self._input() is not x or x._version != self._version:
            self.clear()
            flat = x.reshape(-1, x.shape[-1]).float()
            self._product = (flat.t() @ flat).double()
            self._input, self._version = weakref.ref(x), x._version
        return self._product

    def clear(self) -> None:
        self._input = self._product = None


class HessianAccumulator:
    """Running H = 2 X^T X / n over calibration inputs of one Linear (products in fp32, sum in fp64)."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, products: InputProducts | None = None) -> None:
        """Add activations [..., K] (every leading position is one token); `products` shares X^T X with the
        other Linears reading the same tensor."""
        self.sum += (products if products is not None else InputProducts()).product(x)
        self.count += x.reshape(-1, x.shape[-1]).shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, computed in place: the accumulator is spent afterwards."""
        if self.count == 0:
            raise LowbitError("GPTQ got no calibration tokens for a layer; check the calibration batch")
        return self.sum.mul_(2).div_(self.count)   # the rounding of 2 * sum / count, without a copy


@dataclass
class GPTQReport:
    """What happened while quantizing one weight: its proxy loss, relative output error, and damping."""

    loss: float            # sum over rows of GPTQ's loss (w - q)^2 / (2 d^2)
    relative_error: float  # tr(D H D^T) / tr(W H W^T) with D = W - Q: ||(W-Q)X||^2 / ||WX||^2 on the calibration set
    damp: float            # damping fraction finally used
    retries: int           # times damping was raised because H + damp*I was not positive definite


def damped_inverse_factor(hessian: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising damp x10 until H is positive definite.

    The damping is added to H's diagonal in place and taken off again, so a [K, K] float64 H costs two more
    K x K matrices at most, not a damped copy and an identity besides (for K = 14336 each is 1.6 GB).
    """
    h = hessian.double()
    diagonal = h.diagonal()
    undamped = diagonal.clone()
    mean_diag = undamped.mean().item()
    current = damp
    try:
        for attempt in range(MAX_DAMP_RETRIES + 1):
            torch.add(undamped, current * mean_diag, out=diagonal)
            lower, info = torch.linalg.cholesky_ex(h)
            if info == 0:
                inverse = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
                del inverse
                if info == 0:
                    if attempt:
                        log.warning("GPTQ %s: Hessian was not positive definite with damp %g; succeeded with damp %g",
                                    name or "layer", damp, current)
                    return upper.float(), current, attempt
            current = current * 10 if current > 0 else 1e-4
    finally:
        diagonal.copy_(undamped)
    raise LowbitError(f"GPTQ {name or 'layer'}: Hessian is not positive definite even with damp {current / 10:g}; "
                      "use more calibration samples or a larger --damp")


def _fits_groups(scheme: Scheme) -> bool:
    """True for integer grids with group_size > 0, whose groups GPTQ fits as the sweep reaches them."""
    return isinstance(scheme, IntGrid) and scheme.group_size > 0


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = DEFAULT_DAMP,
                  desc_act: bool = False, static_groups: bool = False, block_size: int = DEFAULT_BLOCK,
                  name: str = "", consume_hessian: bool = False) -> tuple[QuantizedWeight, GPTQReport]:
    """GPTQ-quantize one [N, K] weight given its calibration Hessian [K, K]; returns codes and a report.

    With `consume_hessian` a float64 `hessian` is used as working memory (permuted and altered in place), which
    saves a K x K copy; the caller must not use it afterwards.
    """
    w_orig = weight.detach().float()
    n, k = w_orig.shape
    if hessian.shape != (k, k):
        raise LowbitError(f"GPTQ {name}: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(w_orig.shape)}")
    w = w_orig.clone()
    h = hessian.double() if consume_hessian else hessian.to(torch.float64, copy=True)
    del hessian
    dead = torch.diag(h) == 0          # inputs that were always zero: their columns cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0

    dynamic = _fits_groups(scheme) and not static_groups
    group = scheme.group_size if dynamic else None
    fixed: QuantizedWeight | None = None
    if not dynamic:
        # Statistics fixed up front (per channel/tensor grids, static groups, block schemes such as GGUF's).
        fixed = scheme.quantize(w, importance=torch.diag(h).float())
        gi = fixed.group_index()
        col_scales = expand_groups(fixed.scales, gi)
        col_zeros = expand_groups(fixed.zeros, gi) if fixed.zeros is not None else None

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h.copy_(h[perm])     # in place: a consumed H stays the only K x K matrix besides one temporary
        h.copy_(h[:, perm])
        dead = dead[perm]
        if not dynamic:
            col_scales = col_scales[:, perm]
            col_zeros = col_zeros[:, perm] if col_zeros is not None else None

    hinv, damp_used, retries = damped_inverse_factor(h, damp, name)
    # The sweep works on columns, so it keeps them as contiguous rows: the block of weights, its errors, codes and
    # per-column statistics transposed. Every element sees the same float operations as in the [N, K] layout
    # (elementwise only), and the lazy block update gets the same contiguous [N, B] operand, so codes are the same.
    codes_t = torch.zeros(k, n, dtype=torch.uint8)
    losses = torch.zeros(n)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    if not dynamic:
        scales_t = col_scales.t().contiguous()
        zeros_t = col_zeros.t().contiguous() if col_zeros is not None else None
        del col_scales, col_zeros
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].t().contiguous()          # [B, N]: row i is column i1 + i
        err1 = torch.zeros_like(w1)
        delta1 = torch.zeros_like(w1)               # w - dequantized, per column, for the loss
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic:
                if col % group == 0:
                    # Fit this group on the columns as GPTQ has updated them so far (the block's, then the
                    # following ones not yet updated for this block).
                    span = torch.cat([w1[i:i + group].t(), w[:, i2:i2 + max(0, group - (i2 - col))]], dim=1)
                    s, z = scheme.fit(span)
                    group_scales.append(s)
                    group_zeros.append(z)
                    scale, zero = s, z
            else:
                scale = scales_t[col].unsqueeze(1)
                zero = zeros_t[col].unsqueeze(1) if zeros_t is not None else None
            column = w1[i]
            q = scheme.encode(column.unsqueeze(1), scale, zero)
            codes_t[col] = q[:, 0]
            delta = delta1[i]
            torch.sub(column, scheme.decode(q, scale, zero)[:, 0], out=delta)
            err = torch.div(delta, hinv1[i, i], out=err1[i])
            w1[i:] -= hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
        # the loss terms (w - q)^2 / d^2 / 2 of the block's columns, added to the rows' sums column by column
        terms = delta1.pow_(2).div_(hinv1.diagonal().pow(2).unsqueeze(1)).div_(2)
        for term in terms:
            losses += term
        w[:, i2:] -= err1.t().contiguous() @ hinv[i1:i2, i2:]

    codes = codes_t.t().contiguous()
    del codes_t
    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if dynamic:
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    if dynamic:
        qw = QuantizedWeight(scheme, (n, k), codes=codes, scales=torch.cat(group_scales, dim=1),
                             zeros=torch.cat(group_zeros, dim=1), group_size=group, g_idx=g_idx)
    else:
        with_codes = getattr(scheme, "with_codes", None)
        qw = with_codes(fixed, codes) if with_codes is not None else dataclasses.replace(fixed, codes=codes)

    # The relative error in H's (possibly permuted) column order, with the dead inputs' zeros restored.
    h[dead, dead] = 0
    report = GPTQReport(loss=float(losses.sum()), relative_error=hessian_relative_error(w_orig, qw, h, perm),
                        damp=damp_used, retries=retries)
    return qw, report


def hessian_relative_error(weight: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor,
                           perm: torch.Tensor | None = None) -> float:
    """tr(D H D^T) / tr(W H W^T) with D = W - Q in float64: ||(W-Q)X||^2 / ||WX||^2 on the calibration set.
    `hessian` may be in the column order `perm` (act-order)."""
    diff = (weight - qw.dequantize()).double()
    w64 = weight.double()
    if perm is not None:
        diff, w64 = diff[:, perm], w64[:, perm]
    num = ((diff @ hessian) * diff).sum().item()
    den = ((w64 @ hessian) * w64).sum().item()
    return num / den if den > 0 else 0.0


def output_relative_error(weight: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    """||W X^T - Q X^T|| / ||W X^T|| for activations x [tokens, K] (used in tests and reports)."""
    w = weight.float()
    ref = x.float() @ w.t()
    return ((x.float() @ qw.dequantize().t() - ref).norm() / ref.norm()).item()


def resolve_scheme(config_scheme: Any, default: Scheme) -> Scheme:
    """`options["scheme"]` may be a Scheme object or its saved config dict; else the method's default grid."""
    if config_scheme is None:
        return default
    if isinstance(config_scheme, Scheme):
        return config_scheme
    if isinstance(config_scheme, dict):
        return scheme_from_config(config_scheme)
    raise LowbitError(f"option scheme must be a Scheme or its config dict, not {type(config_scheme).__name__}")


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a Linear-like module's [out, in] weight in place (Conv1D stores it transposed)."""
    target = module.weight
    target.data.copy_(weight.t() if type(module).__name__ == "Conv1D" else weight)


# Act-order with static groups by default: on SmolLM2 (outlier channels) plain GPTQ 4-bit g128 lost to RTN
# (wikitext-2 ppl 50.71 vs 49.88) while act-order + static groups won (47.03); static groups keep g_idx
# contiguous, so the packed kernels and every format still apply. --no-desc-act restores AutoGPTQ's default.
DEFAULT_DESC_ACT = True
DEFAULT_STATIC_GROUPS = True


class CalibratedMethod(Method):
    """A method that sees each decoder block with the activations entering it (GPTQ, AWQ)."""

    needs_calibration = True
    defaults: dict[str, Any] = {}   # option -> value used when the user gives none

    def option(self, key: str, default: Any = None) -> Any:
        """The option's value, else the method's default for it, else `default`."""
        value = self.config.options.get(key)
        return self.defaults.get(key, default) if value is None else value


@register_method
class GPTQ(CalibratedMethod):
    """GPTQ on CPU, one decoder block at a time (see the module docstring)."""

    name = "gptq"
    defaults = {"damp": DEFAULT_DAMP, "desc_act": DEFAULT_DESC_ACT, "static_groups": DEFAULT_STATIC_GROUPS,
                "true_sequential": True, "block_size": DEFAULT_BLOCK}
    option_types = {"damp": float, "desc_act": bool, "static_groups": bool, "true_sequential": bool,
                    "block_size": int, **CALIBRATION_OPTION_TYPES}

    def option_names(self) -> tuple[str, ...]:
        return ("damp", "desc_act", "static_groups", "true_sequential", "block_size", "calib_samples",
                "calib_len", "seed", "scheme", "chunk")

    def scheme(self) -> Scheme:
        c = self.config
        default = IntGrid(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric, clip_search=c.clip_search)
        return resolve_scheme(c.options.get("scheme"), default)

    def quantize_with_hessian(self, name: str, weight: torch.Tensor, hessian: torch.Tensor
                              ) -> tuple[QuantizedWeight, GPTQReport]:
        """GPTQ one weight with this method's options; `hessian` (float64) is consumed as working memory."""
        damp = float(self.option("damp"))
        if not 0 <= damp < 1:
            raise LowbitError(f"--damp {damp} is out of range: use a fraction such as 0.01 (0 <= damp < 1)")
        return gptq_quantize(weight, hessian, self.scheme_for(name), damp=damp, desc_act=self.option("desc_act"),
                             static_groups=self.option("static_groups"),
                             block_size=self.option("block_size"), name=name, consume_hessian=True)

    def quantize_block(self, block: nn.Module, linears: dict[str, nn.Module], inputs: Any = None,
                       arch: Architecture | None = None, prefix: str = "") -> BlockResult:
        """Calibrate and quantize the Linears of one block on its recorded inputs (list of BlockCall).

        With an `arch` and true_sequential (default), Linears are calibrated group by group in the
        architecture's order, each group on the outputs of the already-quantized ones: the block's float
        weights of a finished group are overwritten by their dequantized codes (installing the codes replaces
        them anyway).
        """
        from lowbit.calibration.capture import collect_inputs, first_input

        if inputs is None:
            raise LowbitError("GPTQ needs calibration inputs for every block")
        sequential = ()
        if arch is not None and self.option("true_sequential"):
            sequential = tuple(expand_experts(g, block, arch) for g in arch.sequential)
        groups = sequential_groups(linears, sequential)
        results: dict[str, QuantizedWeight] = {}
        reports: dict[str, GPTQReport] = {}
        for group in groups:
            accumulators = {name: HessianAccumulator(linear_weight(linears[name]).shape[1]) for name in group}
            # an expert sees only the tokens routed to it, possibly none
            optional = {n for n in group if arch is not None and is_expert_linear(arch, n)}
            products = InputProducts()
            collect_inputs(block, {name: linears[name] for name in group}, inputs,
                           lambda name, args, kwargs: accumulators[name].add(first_input(args, kwargs), products),
                           optional=optional)
            products.clear()
            for name in group:
                module = linears[name]
                full = join_name(prefix, name)
                if accumulators[name].count == 0:
                    log.warning("GPTQ: %s received no calibration tokens (no token was routed to it); rounded "
                                "to nearest on the same grid", full)
                    accumulators.pop(name)
                    results[name] = self.quantize_weight(full, linear_weight(module).detach())
                    continue
                qw, report = self.quantize_with_hessian(full, linear_weight(module), accumulators.pop(name).hessian())
                # Later groups of this block are calibrated on what the quantized layers produce.
                set_linear_weight(module, qw.dequantize())
                results[name] = qw
                reports[name] = report
        return BlockResult(results, reports)


def sequential_groups(linears: dict[str, nn.Module], sequential: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """The block's Linears in true-sequential groups (adapter order), or all in one group when not sequential."""
    if not sequential:
        return [tuple(linears)]
    groups = [tuple(n for n in group if n in linears) for group in sequential]
    groups = [g for g in groups if g]
    listed = {n for g in groups for n in g}
    rest = tuple(n for n in linears if n not in listed)
    return groups + ([rest] if rest else [])
