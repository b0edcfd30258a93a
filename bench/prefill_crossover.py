"""Where a prompt should leave the compiled step for GEMMs: prefill time through each path by prompt length.

The compiled step reads each weight once per 16 prompt rows and multiplies it per row (cost ~ rows); the GEMM
path first dequantizes every weight to bf16, then runs one GEMM per weight (a fixed cost plus a small one per
row). Their crossover sets runner.NATIVE_PREFILL_TOKENS per layout. At one thread the times are CPU times, which a
busy machine disturbs far less than wall time; each point is the best of `--reps`.

Usage: python bench/prefill_crossover.py MODEL [MODEL ...] [--tokens 16,32,64,96,128] [--threads 1] [--float]
       [--out bench/results/prefill_crossover.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(spec: str, lengths: list[int], threads: int, reps: int, keep_quantized: bool) -> dict:
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    model, tokenizer = load_model(spec, keep_quantized=keep_quantized)
    engine = Engine(model, tokenizer, max_batch=1, context=max(lengths) + 8, threads=threads)
    decoder = engine.decoder
    chosen = decoder.native_prefill_tokens
    clock = time.process_time if threads == 1 else time.perf_counter
    rows = []
    for length in lengths:
        tokens = torch.randint(0, min(1000, model.config.vocab_size), (1, length),
                               generator=torch.Generator().manual_seed(length))
        point = {"tokens": length}
        for path, limit in (("gemm_ms", 0), ("compiled_ms", 10 ** 9)):
            decoder.native_prefill_tokens = limit
            times = []
            for _ in range(reps):
                began = clock()
                decoder.forward(tokens, slice(0, 1), torch.tensor([0]))
                times.append(clock() - began)
            point[path] = round(1e3 * min(times), 1)
        rows.append(point)
        print(f"{spec}: {length:4d} tokens  GEMMs {point['gemm_ms']:8.1f} ms  compiled step "
              f"{point['compiled_ms']:8.1f} ms", flush=True)
    faster = [r["tokens"] for r in rows if r["gemm_ms"] < r["compiled_ms"]]
    return {"model": spec, "arithmetic": engine.arithmetic, "threads": threads, "chosen_limit": chosen,
            "gemm_faster_from": min(faster) if faster else None, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tokens", default="16,32,64,96,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--float", action="store_true", help="load GGUF files dequantized to float weights")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    results = [measure(m, lengths, args.threads, args.reps, not args.float) for m in args.models]
    for r in results:
        print(f"{r['model']} ({r['arithmetic']}): GEMMs faster from {r['gemm_faster_from']} tokens; "
              f"the engine's limit: {r['chosen_limit']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))


if __name__ == "__main__":
    main()
