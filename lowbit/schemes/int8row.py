"""Row-wise absmax int8 weights, as LLM.int8() (bitsandbytes' `int8_vectorwise_quant`) stores them.

Each output row n keeps SCB[n] = max |W[n, :]| and codes CB = round(W * 127 / SCB) in [-127, 127]; the weight
is CB * SCB / 127. In the QuantizedWeight the signed code is stored offset by 128 (uint8), with zero 128 and
scale SCB / 127, so the generic affine int8 kernels can run it too; `extra["SCB"]` keeps the row absmax exactly
as bitsandbytes writes it. How activations are handled at run time is part of the scheme's configuration
(`activations`, `threshold`) because the runtime kernels read it from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import CorruptFile, LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme, register_scheme

INV_127 = 7.874015718698502e-3  # float32 1/127, the constant bitsandbytes multiplies by to dequantize
ACTIVATION_MODES = ("int8", "int8-asym", "float")


def rowwise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [N, K], SCB float32 [N]) with bitsandbytes' rounding; all-zero rows get code 0."""
    w = weight.float()
    scb = w.abs().amax(dim=1)
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    cb = torch.round(w * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return cb, scb


@register_scheme
@dataclass(frozen=True)
class RowInt8(Scheme):
    """int8 weights with one absmax per output row.

    activations: "int8" = LLM.int8(): per-token absmax int8 activations, input columns holding any |x| >=
    `threshold` computed in floating point (threshold 0: every column in int8); "int8-asym" = dynamic
    quantization with per-token min/max (asymmetric) int8 activations; "float" = weight-only int8.
    """

    kind = "int8-row"
    threshold: float = 6.0
    activations: str = "int8"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_MODES:
            raise LowbitError(f"activation mode {self.activations!r} unknown; use one of {ACTIVATION_MODES}")
        if self.threshold < 0:
            raise LowbitError(f"outlier threshold {self.threshold} must be >= 0 (0 = no outlier columns)")

    @property
    def name(self) -> str:
        if self.activations == "int8":
            return f"llm-int8-t{self.threshold:g}"
        return {"int8-asym": "dynamic-int8", "float": "int8-weight-only"}[self.activations]

    @property
    def affine_bits(self) -> int:
        return 8

    @property
    def quantizes_activations(self) -> bool:
        return self.activations != "float"

    @property
    def code_bits(self) -> int:
        return 8

    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        cb, scb = rowwise_int8(weight.detach())
        return self.from_int8(cb, scb)

    def from_int8(self, cb: torch.Tensor, scb: torch.Tensor) -> QuantizedWeight:
        """Wrap bitsandbytes-style (CB, SCB) as a QuantizedWeight."""
        n, k = cb.shape
        codes = (cb.to(torch.int16) + 128).to(torch.uint8)
        scales = (scb.float() * INV_127).unsqueeze(1)
        return QuantizedWeight(self, (n, k), codes=codes, scales=scales, zeros=torch.full((n, 1), 128.0),
                               group_size=-1, extra={"SCB": scb.float()})

    def int8_codes(self, qw: QuantizedWeight) -> torch.Tensor:
        """CB: the signed int8 codes [N, K]."""
        return (qw.codes.to(torch.int16) - 128).to(torch.int8)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return self.int8_codes(qw).float() * qw.extra["SCB"].view(-1, 1) * INV_127

    def storage_bits(self, qw: QuantizedWeight) -> int:
        n, k = qw.shape
        return 8 * n * k + 32 * n

    def to_tensors(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"CB": self.int8_codes(qw), "SCB": qw.extra["SCB"]}

    def from_tensors(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int
                     ) -> QuantizedWeight:
        if "CB" not in tensors or "SCB" not in tensors:
            raise CorruptFile(f"int8 weight of shape {tuple(shape)} lacks CB/SCB tensors; the file is incomplete")
        cb, scb = tensors["CB"], tensors["SCB"]
        if tuple(cb.shape) != tuple(shape) or scb.numel() != shape[0]:
            raise CorruptFile(f"int8 weight: CB {tuple(cb.shape)} / SCB {tuple(scb.shape)} do not match {shape}")
        return self.from_int8(cb.to(torch.int8), scb.float().reshape(-1))
