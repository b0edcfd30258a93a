"""Where a decode step's time goes: the compiled step's whole-token time against its matmuls timed one by one.

Loads a model (kept quantized), builds the engine (compiled step) and times decode steps at a given position;
then times each weight of the step alone through the same kernels (`clib.linear`, same threads and
arithmetic), grouped by op class (attention q/k/v, attention output, MLP gate/up, MLP down, lm head) and block
type, with the GB/s each class reads. What the step takes beyond its matmuls is attention over the KV cache,
norms, rotary, the embedding lookup, the threads' barriers and Python.

Weights timed alone are warm in the caches (each is run 4 times), so the matmul rows are a lower bound and the
rest an upper one for a model larger than the last-level cache. With one thread times are CPU times.

With --rows B, every step decodes B rows (B cache slots, one token each: continuous batching's step) and each
weight is timed on B activation rows; the sampling of B rows (temperature 0.7, as the server bench asks) is
timed too.

Usage: python bench/profile_decode.py MODEL [--threads 2] [--activations int8] [--position 64] [--steps 20]
       [--rows 1] [--rtn4]
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
    parser.add_argument("--rtn4", action="store_true",
                        help="quantize the (float) model with RTN 4-bit g128, lm_head too (the server bench's model)")
    parser.add_argument("--rows", type=int, default=1, help="rows (cache slots) each step decodes")
    args = parser.parse_args()

    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model
    from lowbit.runtime import clib
    from lowbit.runtime.activations import Activations

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, keep_quantized=not args.rtn4)
    if args.rtn4:
        from lowbit.methods.base import QuantizeConfig
        from lowbit.methods.pipeline import quantize_model

        quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=128, skip=()), progress=False)
    engine = Engine(model, tokenizer, max_batch=args.rows, context=args.position + args.steps + 8,
                    threads=args.threads, activations=args.activations)
    step = engine.decoder.native
    if step is None:
        raise SystemExit(f"no compiled step: {engine.decode_path}")
    print(f"{args.model}: {engine.arithmetic}, {args.threads} threads, {args.rows} rows a step")
    rows_of = args.rows
    slots, positions = torch.arange(rows_of), range(args.position, args.position + args.steps)
    for slot in range(rows_of):                                              # a prompt to attend to
        step(torch.arange(1, args.position + 1) % 1000, torch.full((args.position,), slot, dtype=torch.long),
             torch.arange(args.position), logit_rows=torch.tensor([args.position - 1]))
    # one thread: CPU time, which a busy machine disturbs far less than wall time
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times = []
    for pos in positions:
        began = clock()
        step(torch.full((rows_of,), 17), slots, torch.full((rows_of,), pos))
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
        x = torch.randn(rows_of, spec.k)
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
    print(f"decode step: {total * 1e3:.1f} ms ({rows_of / total:.2f} tok/s), steps {first_steps}...")
    print(f"| op class | types | MB | ms alone | GB/s |")
    for name, kinds, mb, ms, gbs in rows:
        print(f"| {name} | {kinds} | {mb:.1f} | {ms:.1f} | {gbs:.1f} |")
    rest = total - matmul_total
    print(f"| matmuls | | {sum(r[2] for r in rows):.1f} | {matmul_total * 1e3:.1f} | "
          f"{sum(r[2] for r in rows) / 1e3 / matmul_total:.1f} |")
    print(f"| rest (attention, norms, barriers, embedding, Python) | | | {rest * 1e3:.1f} | |")
    print(f"(per-call overhead of clib.linear subtracted: {call_overhead * 1e6:.0f} us)")
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import sample_token

    logits = torch.randn(rows_of, step.vocab)
    params = SamplingParams(temperature=0.7)
    generators = [torch.Generator().manual_seed(i) for i in range(rows_of)]
    began = time.perf_counter()
    for _ in range(5):
        for row in range(rows_of):
            sample_token(logits[row], params, generators[row])
    print(f"sampling {rows_of} rows (temperature 0.7, one call each): {(time.perf_counter() - began) / 5 * 1e3:.1f} ms")



if __name__ == "__main__":
    main()
