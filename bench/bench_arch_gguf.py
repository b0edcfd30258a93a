"""Real-model check of the architecture registry (issue 12): perplexity of a GGUF file imported by lowbit
(its own parser, registry names and layouts) against transformers' own GGUF loading of the same file, and of
lowbit's engine running the file's quantized blocks.

Three computations of the same file's perplexity:
- lowbit float: lowbit's GGUF import (its parser, the registry's tensor names, q/k orders, Gemma's 1 + w),
  dequantized by gguf-py's codecs into transformers' model class, transformers' forward;
- transformers: transformers' own GGUF loader (its parser and name tables, also dequantizing with gguf-py's
  codecs), the same forward;
- lowbit engine: the file kept quantized, run through the engine's compiled step in chunks of 16 tokens (the
  blocks' codes read by lowbit's C kernels, float32 arithmetic), or its torch decoder when the step cannot run it.
The first two share the dequantizer and the forward, so when the import is right their weights are bit-identical
and so are their perplexities: the table reports the weight comparison that explains an exact tie. The third is
independent arithmetic and agrees within float32 rounding, not exactly.

    python -m bench.bench_arch_gguf [--model gemma3-270m-real.gguf] [--tokens 4096] [--ctx 512]

Prints a table and writes bench/results/arch_gguf.json."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.eval.perplexity import evaluate_quality, read_text, tokenize_text, windows
from lowbit.models.gguf_import import load_gguf_as_hf
from lowbit.models.loading import resolve_model_path

try:
    from bench.real_models import PACKAGED, real_model_path
except ImportError:       # run as a script: bench/ is on the path
    from real_models import PACKAGED, real_model_path

SHARED = Path(os.environ.get("LOWBIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CORPUS = SHARED / "corpora" / "wikitext2-raw-test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gemma3-270m-real", help="a .gguf file, or a name in bench/real_models.py")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = real_model_path(args.model) if args.model in PACKAGED else resolve_model_path(args.model)
    t0 = time.perf_counter()
    ours, tok = load_gguf_as_hf(path)
    t_ours = time.perf_counter() - t0
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  trust_remote_code=False).eval()
    t_theirs = time.perf_counter() - t0
    tokens = tokenize_text(tok, read_text(args.corpus), args.tokens)
    weights = compare_weights(ours, theirs)
    a = evaluate_quality(ours, tokens, ctx=args.ctx, progress=False)
    b = evaluate_quality(theirs, tokens, ctx=args.ctx, progress=False)
    del ours, theirs
    engine_ppl, decode_path = engine_perplexity(path, tokens, args.ctx)
    diff = abs(a.perplexity - b.perplexity) / b.perplexity
    engine_diff = abs(engine_ppl - b.perplexity) / b.perplexity
    print(f"weights: {weights['identical']} of {weights['tensors']} tensors bit-identical between the two loads "
          f"(max |difference| among the others {weights['max_abs_difference']:.3g})")
    print("| model | tokens | ctx | lowbit float ppl | transformers ppl | rel. diff | lowbit engine ppl "
          "(decode path) | rel. diff | load s (lowbit / transformers) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {path.name} | {a.tokens} | {args.ctx} | {a.perplexity:.4f} | {b.perplexity:.4f} | {diff:.2e} | "
          f"{engine_ppl:.4f} ({decode_path}) | {engine_diff:.2e} | {t_ours:.1f} / {t_theirs:.1f} |")
    out = Path(__file__).parent / "results" / "arch_gguf.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": path.name, "tokens": a.tokens, "ctx": args.ctx,
                               "lowbit_ppl": a.perplexity, "transformers_ppl": b.perplexity,
                               "relative_difference": diff, "weights": weights,
                               "engine_ppl": engine_ppl, "engine_decode_path": decode_path,
                               "engine_relative_difference": engine_diff,
                               "load_seconds": [t_ours, t_theirs]}, indent=2))


def compare_weights(ours, theirs) -> dict:
    """How many of the two models' tensors (by name) are bit-identical, and the largest difference among the rest."""
    mine, other = ours.state_dict(), theirs.state_dict()
    common = sorted(set(mine) & set(other))
    identical, largest = 0, 0.0
    for name in common:
        x, y = mine[name].float(), other[name].float()
        if x.shape != y.shape:
            largest = float("inf")
        elif torch.equal(x, y):
            identical += 1
        else:
            largest = max(largest, float((x - y).abs().max()))
    return {"tensors": len(common), "identical": identical, "max_abs_difference": largest,
            "only_lowbit": sorted(set(mine) - set(other))[:5], "only_transformers": sorted(set(other) - set(mine))[:5]}


@torch.inference_mode()
def engine_perplexity(path: Path, tokens: torch.Tensor, ctx: int, chunk: int = 16) -> tuple[float, str]:
    """Perplexity of the GGUF kept quantized, through lowbit's engine, and which decode path ran: each window
    fed in chunks of `chunk` consecutive tokens to the compiled step (rows of one cache slot, every row's logits,
    as when it prefills a short prompt), or one token at a time to the torch decoder when the step cannot run."""
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    model, _ = load_model(path, keep_quantized=True)
    engine = Engine(model, context=ctx, prefill_attention_dtype=torch.float32)
    step = engine.decoder.native
    size = chunk if step is not None else 1
    nll, count = 0.0, 0
    for window in windows(tokens, ctx):
        inputs, targets = window[:-1], window[1:]
        for begin in range(0, ctx - 1, size):
            feed = inputs[begin:begin + size]
            positions = torch.arange(begin, begin + feed.numel())
            slots = torch.zeros_like(positions)
            logits = step(feed, slots, positions) if step is not None else engine.decoder.decode(feed, slots, positions)
            nll += float(F.cross_entropy(logits.float(), targets[begin:begin + feed.numel()], reduction="sum"))
            count += feed.numel()
    return math.exp(nll / count), engine.decode_path

if __name__ == "__main__":
    main()
