"""Real-model check of the architecture registry (issue 12): perplexity of a GGUF file imported by lowbit
(its own parser, registry names and layouts) against transformers' own GGUF loading of the same file, and of
lowbit's engine running the file's quantized blocks.

Three computations of the same file's perplexity:
- lowbit float: lowbit's GGUF import (its parser, the registry's tensor names, q/k orders, Gemma's 1 + w),
  dequantized by gguf-py's codecs into transformers' model class, transformers' forward;
- transformers: transformers' own GGUF loader (its parser and name tables, also dequantizing with gguf-py's
  codecs), the same forward;
- lowbit engine: the file kept quantized, decoded token by token through the engine's compiled step (the
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
    a = evaluate_quality(ours, tokens, ctx=args.ctx, progress=False)
    b = evaluate_quality(theirs, tokens, ctx=args.ctx, progress=False)
    diff = abs(a.perplexity - b.perplexity) / b.perplexity
    print(f"| model | tokens | ctx | lowbit ppl | transformers ppl | rel. diff | load s (lowbit / transformers) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {path.name} | {a.tokens} | {args.ctx} | {a.perplexity:.4f} | {b.perplexity:.4f} | {diff:.2e} | "
          f"{t_ours:.1f} / {t_theirs:.1f} |")
    out = Path(__file__).parent / "results" / "arch_gguf.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": path.name, "tokens": a.tokens, "ctx": args.ctx,
                               "lowbit_ppl": a.perplexity, "transformers_ppl": b.perplexity,
                               "relative_difference": diff, "load_seconds": [t_ours, t_theirs]}, indent=2))


if __name__ == "__main__":
    main()
