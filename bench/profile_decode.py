"""Where a decode step's time goes: the compiled step's whole-token time against its matmuls timed one by one.

Loads a model (kept quantized), builds the engine (compiled step) and times decode steps at a given position;
then times each weight of the step alone through the same kernels (`clib.linear`, same threads and
arithmetic), grouped by op class (attention q/k/v, attention output, MLP gate/up, MLP down, lm head) and block
type, with the GB/s each class reads. What the step takes beyond its matmuls is attention over the KV cache,
norms, rotary, the embedding lookup, the threads' barriers and Python.

Weights timed alone are warm in the caches (each is run 4 times), so the matmul rows are a lower bound and the
rest an upper one for a model larger than the last-level cache. With one thread times are CPU times.

Usage: python bench/profile_decode.py MODEL [--threads 2] [--activations int8] [--position 64] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def weight_bytes(spec) -> int:
    from lowbit.runtime.clib import GGML_KINDS, LB_BF16, LB_F16, LB_F32
    from lowbit.schemes.ggml import codec

    names = {v: k for k, v in GGML_KINDS.items()}
    if spec.kind in names:
        c = codec(names[spec.kind])
        return spec.n * (spec.k // c.block) * c.type_size
    return spec.n * spec.k * {LB_F32: 4, LB_F16: 2, LB_BF16: 2}.get(spec.kind, 1)


def kind_name(spec) -> str:
    from lowbit.runtime.clib import GGML_KINDS

    names = {v: k for k, v in GGML_KINDS.items()}
    return names.get(spec.kind, {0: "f32", 1: "u8", 2: "nib"}.get(spec.kind, str(spec.kind)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="int8")
    parser.add_argument("--position", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model
    from lowbit.runtime import clib
    from lowbit.runtime.activations import Activations

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, keep_quantized=True)
    engine = Engine(model, tokenizer, context=args.position + args.steps + 8, threads=args.threads,
                    activations=args.activations)
    step = engine.decoder.native
    if step is None:
        raise SystemExit(f"no compiled step: {engine.decode_path}")
    print(f"{args.model}: {engine.arithmetic}, {args.threads} threads")
    slot, positions = torch.tensor([0]), range(args.position, args.position + args.steps)
    step(torch.arange(1, args.position + 1) % 1000, torch.zeros(args.position, dtype=torch.long),
         torch.arange(args.position), last_only=True)                       # a prompt to attend to
    # one thread: CPU time, which a busy machine disturbs far less than wall time
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times = []
    for pos in positions:
        began = clock()
        step(torch.tensor([17]), slot, torch.tensor([pos]))
        times.append(clock() - began)
    total = statistics.median(times)

    act8 = Activations.parse(args.activations)
    groups: dict[str, list] = defaultdict(list)
    for index in range(step.spec.n_layers):
        layer = step.layers[index]
        for name, parts in (("attn qkv", layer.qkv), ("attn out", [layer.o]), ("mlp gate/up", layer.gate_up),
                            ("mlp down", [layer.down])):
            groups[name].extend(p for p in parts if p.n)
    groups["lm head"].append(step.spec.lm_head)

    def timed(spec) -> float:
        x = torch.randn(1, spec.k)
        use = clib.uses_act8(spec, act8)
        clib.linear(spec, x, act8=use)
        runs = []
        for _ in range(3):
            began = clock()
            clib.linear(spec, x, act8=use)
            runs.append(clock() - began)
        return min(runs)

    empty = torch.zeros(32, 32)
    tiny = clib.linear_spec(torch.nn.Linear(32, 32, bias=False).requires_grad_(False))[0]
    call_overhead = min(timed(tiny) for _ in range(5))
    del empty
    rows, matmul_total = [], 0.0
    for name, specs in groups.items():
        seconds = sum(max(timed(s) - call_overhead, 0.0) for s in specs)
        size = sum(weight_bytes(s) for s in specs)
        kinds = ",".join(sorted({kind_name(s) for s in specs}))
        rows.append((name, kinds, size / 1e6, seconds * 1e3, size / seconds / 1e9 if seconds else 0.0))
        matmul_total += seconds
    first_steps = [round(t * 1e3, 1) for t in times[:5]]
    print(f"decode step: {total * 1e3:.1f} ms ({1 / total:.2f} tok/s), steps {first_steps}...")
    print(f"| op class | types | MB | ms alone | GB/s |")
    for name, kinds, mb, ms, gbs in rows:
        print(f"| {name} | {kinds} | {mb:.1f} | {ms:.1f} | {gbs:.1f} |")
    rest = total - matmul_total
    print(f"| matmuls | | {sum(r[2] for r in rows):.1f} | {matmul_total * 1e3:.1f} | "
          f"{sum(r[2] for r in rows) / 1e3 / matmul_total:.1f} |")
    print(f"| rest (attention, norms, barriers, embedding, Python) | | | {rest * 1e3:.1f} | |")
    print(f"(per-call overhead of clib.linear subtracted: {call_overhead * 1e6:.0f} us)")


if __name__ == "__main__":
    main()
