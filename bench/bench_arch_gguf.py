"""Real-model check of the architecture registry (issue 12): perplexity of a GGUF file imported by lowbit
(its own parser, registry names and layouts) against transformers' own GGUF loading of the same file.

    python -m bench.bench_arch_gguf [--model gemma3-270m] [--tokens 4096] [--ctx 512]

Prints a table and writes bench/results/arch_gguf.json."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lowbit.eval.perplexity import evaluate_quality, read_text, tokenize_text
from lowbit.models.gguf_import import load_gguf_as_hf
from lowbit.models.loading import resolve_model_path

SHARED = Path(os.environ.get("LOWBIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CORPUS = SHARED / "corpora" / "wikitext2-raw-test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = resolve_model_path(args.model)
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
