"""QuantEmbedding: a token embedding held quantized, dequantizing only the rows a batch looks up.

A large vocabulary's embedding is the biggest tensor of a small model (Qwen2.5-0.5B: 151,936 x 896, 545 MB in
float32 against 145 MB as the file's Q8_0 blocks). A lookup reads a few rows, so it decodes those rows only; a
tied output head reads the same QuantizedWeight through its own QuantLinear, so the table is held once.
"""
from __future__ import annotations

import torch
from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear


def selected_rows(qw: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """The weight of rows `index` (int64 [R]) only, in the scheme's own representation."""
    rows = getattr(qw.scheme, "rows", None)
    if rows is not None:
        return rows(qw, index)
    if qw.extra:
        raise LowbitError(f"scheme {qw.scheme.name} cannot select embedding rows; keep the embedding in float")
    return QuantizedWeight(qw.scheme, (int(index.numel()), qw.in_features), codes=qw.codes[index],
                           scales=qw.scales[index], zeros=None if qw.zeros is None else qw.zeros[index],
                           group_size=qw.group_size, g_idx=qw.g_idx)


class QuantEmbedding(QuantLinear):
    """nn.Embedding over a QuantizedWeight [vocab, dim]; `scale` multiplies the rows (Gemma's sqrt(dim)).

    A QuantLinear by type, so everything that walks a model's quantized weights (formats, footprint, the GGUF
    writer) sees it; only its forward differs (a lookup, not a matmul)."""

    def __init__(self, qweight: QuantizedWeight, scale: torch.Tensor | float | None = None,
                 padding_idx: int | None = None, kernel: str = "auto"):
        super().__init__(qweight, None, kernel)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise LowbitError(f"token ids must lie in [0, {self.num_embeddings}) for this embedding")
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = selected_rows(self.qweight, unique).dequantize()[inverse]
        if self.scale is not None:
            rows = rows * (self.scale.to(rows.dtype) if isinstance(self.scale, torch.Tensor) else self.scale)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def dequantized(self) -> torch.nn.Module:
        """A float module computing the same lookup (the reference transformers would run)."""
        table = torch.nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        table.weight.data = self.qweight.dequantize()
        if self.scale is None:
            return table
        scale = self.scale
        return _Scaled(table, scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.qweight.scheme.name}"


class _Scaled(torch.nn.Module):
    """An embedding whose rows are multiplied by a constant (Gemma's sqrt(hidden))."""

    def __init__(self, table: torch.nn.Embedding, scale):
        super().__init__()
        self.table, self.scale = table, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table(ids)
        return rows * (self.scale.to(rows.dtype) if isinstance(self.scale, torch.Tensor) else self.scale)
