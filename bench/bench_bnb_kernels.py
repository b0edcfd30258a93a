"""Per-layer timing of the bitsandbytes-scheme kernels against dense fp32 / bf16 F.linear (issue 5).

SmolLM2-135M's Linear shapes, batch 1 (decode) and 128 tokens (prefill). Kernels are timed interleaved,
round-robin, and the median of the rounds is kept, so a busy shared machine slows all of them alike.
Prints a table and writes bench/results/bnb_kernels.json.

    python bench/bench_bnb_kernels.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.eval.report import format_table, write_json
from lowbit.methods.base import QuantizeConfig, get_method
from lowbit.runtime.qlinear import QuantLinear

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down of SmolLM2-135M
VARIANTS = [("nf4", {}, "bnb4-tiled"), ("nf4", {}, "bnb4-int8"), ("nf4", {}, "bnb4-cached"),
            ("nf4", {"double_quant": True}, "bnb4-tiled"), ("int8", {"threshold": 6.0}, "llm-int8"),
            ("dynamic-int8", {}, "dynamic-int8"), ("rtn", {}, "int4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bnb_kernels.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for tokens in (1, 128):
        calls: dict[str, list] = {}
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            x = torch.randn(tokens, k)
            wb, xb = w.bfloat16(), x.bfloat16()
            calls.setdefault("fp32 dense", []).append(lambda x=x, w=w: F.linear(x, w))
            calls.setdefault("bf16 dense", []).append(lambda x=xb, w=wb: F.linear(x, w))
            for method, options, kernel in VARIANTS:
                config = QuantizeConfig(method=method, bits=4, group_size=64, options=options)
                layer = QuantLinear(get_method(config).quantize_weight("l", w), kernel=kernel)
                assert layer.kernel_name == kernel, (kernel, layer.kernel_name)
                label = f"{method}{'+dq' if options.get('double_quant') else ''} [{kernel}]"
                calls.setdefault(label, []).append(lambda x=x, layer=layer: layer(x))
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for fns in calls.values():  # warm up (kernels prepare their state on the first call)
                for fn in fns:
                    fn()
            for _ in range(args.rounds):
                for name, fns in calls.items():
                    t0 = time.perf_counter()
                    for fn in fns:
                        fn()
                    times[name].append(time.perf_counter() - t0)
        fp32 = statistics.median(times["fp32 dense"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"tokens": tokens, "kernel": name, "us_per_block_of_4_layers": med * 1e6,
                         "speed_vs_fp32": fp32 / med})
    columns = [("tokens", "tokens", "d"), ("kernel", "kernel", "s"),
               ("us_per_block_of_4_layers", "us (4 shapes)", ".0f"),
               ("speed_vs_fp32", "speed vs fp32", ".2f")]
    print(format_table(rows, columns))
    write_json(args.out, {"shapes": SHAPES, "threads": torch.get_num_threads(), "rounds": args.rounds, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
