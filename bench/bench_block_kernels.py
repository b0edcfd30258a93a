"""Throughput of the GGUF block kernels (csrc/ggml_blocks.h) per type, one activation row (decode).

For each block type: a weight of real shape (rows x width, default Qwen2.5-Coder-1.5B's MLP 8960 x 1536) filled
with random blocks (sane float16 scales), y = x W^T timed through `clib.linear` with float32 and int8
activations. Two regimes:
  hot     one weight, again and again (it sits in L2/L3): the kernel's arithmetic speed;
  stream  distinct copies cycled through, --stream-mb in total (larger than the L3 cache): what decoding a model
          bigger than the cache sees, next to the memory read bandwidth measured in the same run.
Figures are GB/s of block bytes read (higher is better); weights per ns = GB/s / bytes per weight. On one thread
the time is the process's CPU time, so a busy machine slows the figures less (its caches are still shared).

Usage: python bench/bench_block_kernels.py [--types Q4_K,Q6_K,Q5_0,Q8_0] [--threads 1,2] [--rows 8960]
       [--width 1536] [--stream-mb 1024]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.runtime import clib  # noqa: E402
from lowbit.schemes.ggml import codec  # noqa: E402

# byte offsets of each type's float16 scale fields (the rest of a random block is any bits)
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, width: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    c = codec(type_name)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * (width // c.block), c.type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for at in HALF_FIELDS[type_name]:
        blocks[:, at:at + 2] = scale
    return torch.from_numpy(blocks.reshape(-1)), (rows, width)


def time_linear(specs: list, x: torch.Tensor, act8: bool, seconds: float, clock) -> float:
    """Seconds per call on `clock`, cycling through `specs`, after one warm round."""
    for spec in specs:
        clib.linear(spec, x, act8=act8)
    calls, began = 0, clock()
    while clock() - began < seconds or calls < 2 * len(specs):
        clib.linear(specs[calls % len(specs)], x, act8=act8)
        calls += 1
    return (clock() - began) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_K,Q6_K,Q5_0,Q8_0,Q4_0,Q4_1")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", type=int, default=8960)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--stream-mb", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    from lowbit.engine.bench import memory_read_bandwidth

    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"threads {threads}: memory read {memory_read_bandwidth(threads, size_mb=512):.1f} GB/s")
        print(f"| type | MB | hot f32 | hot int8 | stream f32 | stream int8 |")
        for type_name in args.types.split(","):
            blocks, shape = random_blocks(type_name, args.rows, args.width, 0)
            mb = blocks.numel() / 1e6
            copies = max(1, int(args.stream_mb / mb))
            kept = [random_blocks(type_name, args.rows, args.width, i)[0] if i else blocks for i in range(copies)]
            specs = [clib.ggml_block_spec(b, type_name, shape)[0] for b in kept]
            x = torch.randn(1, args.width)
            rates = []
            for chosen in (specs[:1], specs):
                for act8 in (False, True):
                    clock = time.process_time if threads == 1 else time.perf_counter
                    rates.append(mb / 1e3 / time_linear(chosen, x, act8, args.seconds, clock))
            print(f"| {type_name} | {mb:.1f} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)
            del kept, specs


if __name__ == "__main__":
    main()
