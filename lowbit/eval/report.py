"""One evaluation of a model: quality against text (and a base model), size, memory and speed."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.engine.generate import GenerationStats, SamplingParams, generate_ids
from lowbit.errors import LowbitError
from lowbit.eval.footprint import footprint, path_size, peak_rss_bytes
from lowbit.eval.perplexity import evaluate_quality
from lowbit.runtime.cpu import float32_arithmetic


@dataclass
class EvalResult:
    name: str
    method: str
    bits_per_weight: float | None     # over quantized layers (None for an unquantized model)
    model_bits_per_weight: float      # over all weights
    size_mb: float                    # on disk when a path is known, else in memory
    perplexity: float
    tokens: int
    kld: float | None
    top1_agreement: float | None
    base_perplexity: float | None
    prompt_tokens_per_s: float | None     # None when speed was not measured (--no-speed)
    decode_tokens_per_s: float | None
    peak_rss_mb: float
    seconds: float
    compute: str = "float32"              # the arithmetic quality was measured in: float32, or the runtime's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speed(model, tokens: torch.Tensor, prompt_len: int = 128, new_tokens: int = 32) -> GenerationStats:
    """Prompt-processing and greedy decode speed at batch 1 on the first `prompt_len` tokens."""
    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    for _ in generate_ids(model, tokens[:prompt_len], params, stats):
        pass
    return stats


COMPUTE_CHOICES = ("float32", "runtime")


def evaluate(model, tokens: torch.Tensor, name: str, ctx: int = 512, base=None, path: str | Path | None = None,
             speed_tokens: int = 32, progress: bool = True, speed: bool = True,
             compute: str = "float32") -> EvalResult:
    """Every figure `lowbit eval` reports, for one model.

    Quality is measured in float32 arithmetic by default, so the figures are what quantization lost: the
    runtime's fast kernels round activations to bf16 (int4pack, int8pack, bf16 GEMMs on AMX machines), which adds
    error the quantized weights did not make. compute="runtime" measures what the runtime computes instead.
    Speed is always the runtime's own."""
    if compute not in COMPUTE_CHOICES:
        raise LowbitError(f"unknown compute {compute!r}; choose one of: {', '.join(COMPUTE_CHOICES)}")
    t0 = time.perf_counter()
    with float32_arithmetic() if compute == "float32" else contextlib.nullcontext():
        quality = evaluate_quality(model, tokens, ctx=ctx, base=base, progress=progress)
    fp = footprint(model)
    stats = (measure_speed(model, tokens, prompt_len=min(128, tokens.numel() - 1), new_tokens=speed_tokens)
             if speed else None)
    config = getattr(model, "lowbit_config", None)
    size = path_size(path) if path is not None else fp.total_bytes
    return EvalResult(
        name=name, method=config.method if config else "none",
        bits_per_weight=fp.quantized_bits_per_weight, model_bits_per_weight=fp.model_bits_per_weight,
        size_mb=size / 1e6, perplexity=quality.perplexity, tokens=quality.tokens, kld=quality.kld,
        top1_agreement=quality.top1_agreement, base_perplexity=quality.base_perplexity,
        prompt_tokens_per_s=stats.prompt_tokens_per_s if stats else None,
        decode_tokens_per_s=stats.decode_tokens_per_s if stats else None,
        peak_rss_mb=peak_rss_bytes() / 1e6, seconds=time.perf_counter() - t0, compute=compute)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: columns are (key, header, format spec); missing values print as '-'."""
    header = [h for _, h, _ in columns]
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        body.append(cells)
    widths = [max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in body]
    return "\n".join(lines)


EVAL_COLUMNS = [("name", "model", "s"), ("method", "method", "s"), ("compute", "compute", "s"),
                ("bits_per_weight", "bpw", ".3f"),
                ("size_mb", "size MB", ".1f"), ("perplexity", "ppl", ".3f"), ("kld", "KLD", ".5f"),
                ("top1_agreement", "top-1", ".3f"), ("prompt_tokens_per_s", "pp tok/s", ".1f"),
                ("decode_tokens_per_s", "tg tok/s", ".1f"), ("peak_rss_mb", "peak MB", ".0f")]


def write_json(path: str | Path, payload: Any) -> None:
    from lowbit.formats.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
