"""CPU seconds per phase of GPTQ and AWQ on one decoder layer of a real model (issue 11 item 6).

Loads Qwen2.5-0.5B (dequantized from its packaged Q4_K_M GGUF), captures what enters the decoder blocks for
16 x 512 wikitext-2 tokens (seeded windows beyond its first 200k characters, as bench_gptq_awq.py), runs the
float blocks before `--layer`, then quantizes that one layer as `walk` does (quantize_block, install, run_block)
with every phase timed: the functions below are wrapped by a profiler that charges each call's process CPU time
(all threads, `time.process_time`) and wall time to its phase, minus the time of phases nested inside it (so the
forward passes of `collect_inputs` exclude the Hessian accumulation their hooks do). Process CPU time counts
every thread, so with `--threads 2` OpenMP's spin-waiting is included; the default `--threads 1` gives the
CPU-seconds of the work itself, which the machine's other load changes little.

    python bench/bench_calib_speed.py --label before            # both methods, layer 0, 1 thread
    python bench/bench_calib_speed.py --label after --methods gptq --threads 2

Writes (merges by label) bench/results/calib_speed.json and prints a table per method.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results" / "calib_speed.json"
WIKI = SHARED / "corpora" / "wikitext2-raw-test.txt"
MODEL = ROOT / ".cache" / "models" / "qwen2.5-0.5b-real.gguf"
CALIB_OFFSET = 200_000

# phase name -> "module:attribute path" of the function charged to it (missing ones are skipped, so the same
# script profiles older and newer trees)
PHASES = {
    "forward passes (collect_inputs)": ["lowbit.calibration.capture:collect_inputs",
                                        "lowbit.methods.awq:collect_inputs"],
    "hessian accumulation": ["lowbit.methods.gptq:HessianAccumulator.add",
                             "lowbit.methods.gptq:SharedHessians.add"],
    "hessian finish (2 sum / n)": ["lowbit.methods.gptq:HessianAccumulator.hessian"],
    "cholesky + inverse": ["lowbit.methods.gptq:damped_inverse_factor"],
    "gptq column loop (rest of gptq_quantize)": ["lowbit.methods.gptq:gptq_quantize"],
    "gptq report (relative error)": ["lowbit.methods.gptq:hessian_relative_error"],
    "dequantize": ["lowbit.quantized:QuantizedWeight.dequantize"],
    "awq channel magnitudes (hooks)": ["lowbit.methods.awq:InspectedInputs.add"],
    "awq alpha search passes": ["lowbit.methods.awq:search_alpha_grid"],
    "rest of quantize_block (AWQ: reference + unscaled passes)": ["lowbit.methods.awq:AWQ.quantize_block",
                                                               "lowbit.methods.gptq:GPTQ.quantize_block"],
    "awq clip search": ["lowbit.methods.awq:clip_ranges"],
    "grid fit + rounding (IntGrid.quantize)": ["lowbit.schemes.intgrid:IntGrid.quantize"],
    "awq report (output error)": ["lowbit.methods.awq:output_error"],
    "install (packing)": ["lowbit.methods.base:BlockResult.install"],
    "next block inputs (run_block)": ["lowbit.calibration.capture:run_block"],
}


class PhaseProfiler:
    """Charges the CPU and wall time of wrapped calls to phases, exclusive of nested wrapped calls."""

    def __init__(self):
        self.cpu = defaultdict(float)
        self.wall = defaultdict(float)
        self.calls = defaultdict(int)
        self._stack: list[list] = []   # [phase, cpu start, wall start, nested cpu, nested wall]

    def wrap(self, phase: str, fn):
        profiler = self

        def timed(*args, **kwargs):
            frame = [phase, time.process_time(), time.perf_counter(), 0.0, 0.0]
            profiler._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                profiler._stack.pop()
                cpu = time.process_time() - frame[1]
                wall = time.perf_counter() - frame[2]
                profiler.cpu[phase] += cpu - frame[3]
                profiler.wall[phase] += wall - frame[4]
                profiler.calls[phase] += 1
                if profiler._stack:
                    profiler._stack[-1][3] += cpu
                    profiler._stack[-1][4] += wall
        return timed

    @contextlib.contextmanager
    def installed(self):
        undo = []
        for phase, targets in PHASES.items():
            for target in targets:
                module_name, path = target.split(":")
                owner = importlib.import_module(module_name)
                *parents, attr = path.split(".")
                for part in parents:
                    owner = getattr(owner, part, None)
                original = getattr(owner, attr, None) if owner is not None else None
                if original is None:
                    continue
                undo.append((owner, attr, original))
                setattr(owner, attr, self.wrap(phase, original))
        try:
            yield self
        finally:
            for owner, attr, original in reversed(undo):
                setattr(owner, attr, original)


def calibration_batch(tokenizer, samples: int, seq_len: int, seed: int = 0):
    from lowbit.calibration.text import sample_windows, tokenize_for_calibration

    text = WIKI.read_text(encoding="utf-8")[CALIB_OFFSET:]
    return sample_windows(tokenize_for_calibration(tokenizer, text[: samples * seq_len * 8]), samples, seq_len, seed)


def profile_layer(method_name: str, args) -> dict:
    import torch

    from lowbit.calibration import capture
    from lowbit.calibration.capture import capture_block_calls
    from lowbit.methods.base import QuantizeConfig, get_method
    from lowbit.methods.pipeline import block_linears, effective_skip
    from lowbit.models.arch import architecture_for
    from lowbit.models.loading import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model.eval()
    arch = architecture_for(model)
    arch.prepare(model)
    options = dict(json.loads(args.options)) if args.options else {}
    config = QuantizeConfig(method=method_name, bits=args.bits, group_size=args.group, symmetric=False,
                            skip=("lm_head",), options=options)
    method = get_method(config)
    skip = effective_skip(model, config)
    batch = calibration_batch(tokenizer, args.calib_samples, args.calib_len)
    with torch.no_grad():
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        recorded = capture_block_calls(model, arch, batch, 8)
        captured = (time.process_time() - t_cpu, time.perf_counter() - t_wall)
        blocks = arch.blocks(model)
        calls = None
        for i in range(args.layer):
            calls = capture.run_block(blocks[i], recorded.calls_for(i, calls))
        calls = recorded.calls_for(args.layer, calls)
        block = blocks[args.layer]
        prefix = arch.block_prefix(args.layer)
        profiler = PhaseProfiler()
        with profiler.installed():
            t_cpu, t_wall = time.process_time(), time.perf_counter()
            result = method.quantize_block(block, block_linears(block, prefix, skip), calls, arch, prefix)
            result.install(block)
            calls = capture.run_block(block, calls)   # looked up now: the profiler wraps it
            total = (time.process_time() - t_cpu, time.perf_counter() - t_wall)
    errors = {name: float(r.relative_error) for name, r in result.reports.items()}
    return {
        "method": method_name, "layer": args.layer, "threads": torch.get_num_threads(),
        "tokens": int(batch.numel()), "capture_cpu_s": round(captured[0], 2), "capture_wall_s": round(captured[1], 2),
        "layer_cpu_s": round(total[0], 2), "layer_wall_s": round(total[1], 2),
        "phases_cpu_s": {k: round(v, 2) for k, v in sorted(profiler.cpu.items(), key=lambda kv: -kv[1])},
        "phases_wall_s": {k: round(v, 2) for k, v in profiler.wall.items()},
        "phase_calls": dict(profiler.calls),
        "relative_errors": errors,
        "codes_sha256": codes_digest(result),
    }


def codes_digest(result) -> str:
    """SHA-256 of the layer's stored tensors (names in order), to check that a speed-up kept the codes."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(result.weights):
        qw = result.weights[name]
        digest.update(name.encode())
        for key, value in sorted(qw.scheme.to_tensors(qw).items()):
            digest.update(key.encode())
            digest.update(value.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="row label, e.g. before / after")
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--options", default="", help="method options as JSON, e.g. '{\"alpha_search\": \"grid\"}'")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for method_name in args.methods.split(","):
        row = profile_layer(method_name, args)
        row.update(label=args.label, model=Path(args.model).name, options=args.options,
                   load_avg=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   machine=platform.processor() or platform.machine())
        rows.append(row)
        print(f"\n{args.label}: {method_name} layer {row['layer']}, {row['tokens']} tokens, {row['threads']} thread(s), "
              f"load {row['load_avg'][0]:.2f}: {row['layer_cpu_s']:.1f} CPU-s, {row['layer_wall_s']:.1f} s wall "
              f"(capture {row['capture_cpu_s']:.1f} CPU-s); codes {row['codes_sha256'][:12]}")
        for phase, cpu in row["phases_cpu_s"].items():
            print(f"  {phase:58s} {cpu:8.2f} CPU-s  {row['phases_wall_s'][phase]:8.2f} s  "
                  f"x{row['phase_calls'][phase]}")
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in existing if (r["label"], r["method"], r.get("threads")) not in
            {(r2["label"], r2["method"], r2["threads"]) for r2 in rows}]
    out.write_text(json.dumps(keep + rows, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
