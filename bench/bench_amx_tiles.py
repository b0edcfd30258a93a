"""Many-row GGUF matmuls with int8 activations: AMX tiles against the AVX-512 VNNI kernels, side by side.

One weight of a real shape (default 8192 x 2048, Llama-3.2-1B's gate) per block type, random values quantized by
lowbit's GGUF quantizers; x of M rows (a continuous-batching step's rows); each point the best of 3 calls, one
thread, CPU time (a busy machine disturbs it little). The tile path is switched with `lowbit_amx()`.

Usage: python bench/bench_amx_tiles.py [--types Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K] [--rows 16,32,64]
       [--shape 8192x2048] [--out bench/results/amx_tiles.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from lowbit.runtime import clib
    from lowbit.schemes.ggml import quantize_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--rows", default="16,32,64")
    parser.add_argument("--shape", default="8192x2048")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lib = clib.native_library()
    if lib is None or not lib.lowbit_amx(-1):
        sys.exit("no AMX tile path on this machine (or no compiled library): nothing to compare")
    torch.set_num_threads(1)
    n, k = (int(v) for v in args.shape.split("x"))
    weight = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    rows = []
    try:
        for type_name in args.types.split(","):
            spec, keep = clib.ggml_block_spec(torch.from_numpy(quantize_rows(weight, type_name)), type_name, (n, k))
            for m in (int(v) for v in args.rows.split(",")):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                best = {}
                for name, mode in (("tiles_ms", 1), ("vnni_ms", 0)):
                    lib.lowbit_amx(mode)
                    clib.linear(spec, x, act8=True)
                    times = []
                    for _ in range(3):
                        began = time.process_time()
                        clib.linear(spec, x, act8=True)
                        times.append(time.process_time() - began)
                    best[name] = round(1e3 * min(times), 2)
                row = {"type": type_name, "rows": m, **best, "speedup": round(best["vnni_ms"] / best["tiles_ms"], 2)}
                rows.append(row)
                print(f"{type_name} {m:3d} rows: tiles {best['tiles_ms']:7.2f} ms  VNNI {best['vnni_ms']:7.2f} ms  "
                      f"{row['speedup']:.2f}x", flush=True)
    finally:
        lib.lowbit_amx(1)
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "shape": [n, k], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
