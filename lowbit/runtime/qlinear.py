"""QuantLinear: a drop-in replacement for nn.Linear that computes with a QuantizedWeight."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.cpu import float32_required
from lowbit.runtime.kernels import select_kernel


class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W = weight_of(*params) rebuilt from its codes in the forward pass and again in the backward
    pass: no float copy of W outlives one call.

    The one differentiable path of every layer held as codes. QuantLinear (adapters trained on a quantized base)
    passes no params: the codes stay frozen and grad_x = grad_y W on a freshly dequantized W. Layers whose
    statistics train (qat.ScaleTrainableLinear: learned scales, codes fixed) pass them as params: their gradient
    is that of W(params) against grad_W = grad_y^T x, by autograd through `weight_of`. The arithmetic is float32,
    the same numbers as the float model holding the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_of: Callable[..., torch.Tensor],   # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        ctx.weight_of, ctx.input_dtype = weight_of, x.dtype
        trains_weight = any(p.requires_grad for p in params)
        ctx.save_for_backward(x if trains_weight else None, *params)
        with torch.no_grad():
            return (x.float() @ weight_of(*params).t()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):   # type: ignore[override]
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            weight = ctx.weight_of(*leaves)
        grad_y = grad_y.float()
        grad_x = (grad_y @ weight.detach()).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(leaves)
        if x is not None:
            grad_weight = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()   # [N, K]
            trained = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            for i, grad in zip(trained, torch.autograd.grad(weight, [leaves[i] for i in trained], grad_weight)):
                grad_params[i] = grad
        return grad_x, None, *grad_params


def checked_output_order(order: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    """`order` as an int64 permutation of range(out_features), or None for no order (or the identity, which
    needs no gather); a LowbitError for anything else."""
    if order is None:
        return None
    if (not isinstance(order, torch.Tensor) or order.dim() != 1 or order.numel() != out_features
            or order.dtype.is_floating_point or order.dtype.is_complex or order.dtype == torch.bool):
        shape = list(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise LowbitError(f"QuantLinear output_order must be an integer tensor of {out_features} values (the "
                          f"layer's outputs), got {shape}")
    order = order.to(torch.int64).contiguous()
    identity = torch.arange(out_features)
    if not torch.equal(torch.sort(order).values, identity):
        raise LowbitError(f"QuantLinear output_order must be a permutation of 0..{out_features - 1} (each output "
                          "once); it repeats or omits outputs")
    return None if torch.equal(order, identity) else order


def rows_reordered(qw: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight | None:
    """A copy of `qw` whose row i is its row order[i], or None for a scheme whose extra tensors cannot be
    selected by row."""
    from lowbit.runtime.qembedding import selected_rows

    try:
        return selected_rows(qw, order)
    except LowbitError:
        return None


class QuantLinear(nn.Module):
    """y = x W^T + b with W held quantized; the kernel and its packed state are chosen on first use.

    `output_order` (int64 [out_features], a permutation): the layer's outputs are y[..., output_order] of the
    stored rows' products, the bias added after. A checkpoint whose rows are stored in another order (llama.cpp's
    interleaved-rope q and k rows) is then computed from its stored bytes (a view of the file) instead of a
    reordered copy. Code that reads `qweight` row by row must honour `output_order` (or `ordered_qweight()`);
    `weight` is in output order."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto",
                 output_order: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.output_order = checked_output_order(output_order, self.out_features)
        self.kernel_preference = kernel
        self._kernel = None
        self._state = None

    def ordered_qweight(self) -> QuantizedWeight:
        """The weight with its rows in output order: `qweight` itself when there is no order, else a reordered
        copy (for writers and other code that reads rows as the layer's outputs)."""
        if self.output_order is None:
            return self.qweight
        reordered = rows_reordered(self.qweight, self.output_order)
        if reordered is None:
            raise LowbitError(f"a {self.qweight.scheme.name} weight with an output order cannot be reordered by "
                              "rows (its scheme keeps extra tensors)")
        return reordered

    def set_kernel(self, kernel: str) -> None:
        """Choose a kernel by name ('auto', 'reference', 'u8', 'int4', 'int8pack', 'bf16', ...;
        runtime.kernels.KERNELS lists them)."""
        self.kernel_preference = kernel
        self._kernel = self._state = None

    @property
    def kernel_name(self) -> str:
        return select_kernel(self.qweight, self.kernel_preference).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = self._in_output_order(DequantizedMatmul.apply(x, self.qweight.dequantize))
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self._kernel is None:
            self._kernel = select_kernel(self.qweight, self.kernel_preference)
            self._state = self._kernel.prepare(self.qweight)
        if float32_required() and not self._kernel.computes_in_float32(self._state):
            from lowbit.runtime.fast_kernels import prefill_matmul

            y = prefill_matmul(x.reshape(-1, x.shape[-1]).float(), self.qweight)
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = self._kernel.matmul(x, self._state)
        y = self._in_output_order(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _in_output_order(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_order is None else y.index_select(-1, self.output_order)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in output order, for code that inspects `.weight` (not used on the compute
        path)."""
        weight = self.qweight.dequantize()
        return weight if self.output_order is None else weight[self.output_order]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.qweight.scheme.name}, bias={self.bias is not None}"
                + (", output_order" if self.output_order is not None else ""))
