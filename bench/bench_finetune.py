"""Training on quantized bases (issue 14), measured side by side in one run.

For stories260K (TinyStories validation: trained on its first 90%, perplexity on the held-out last 10%) and
SmolLM2-135M (tinyshakespeare, same split):
- lora: held-out perplexity before / after LoRA on RTN-4, GPTQ-4 and NF4 bases, against peft on the float base
  (the same loop and options), with time per step and peak RSS;
- qlora vs peft + transformers on the float model (SmolLM2): peak RSS and time per step, each in its own
  process (VmHWM: the process's peak resident memory; also the peak while training, reset after loading);
- merge (stories260K): the LoRAs trained on RTN-4 and GPTQ-4 merged into the float weights and re-quantized at 4
  bits (RTN and GPTQ on a fresh grid; GPTQ on the base's kept grid; that + end-to-end distillation towards the
  float merged model), share of the LoRA's gain kept;
- qat vs RTN and GPTQ at 4, 3 and 2 bits on the same grid (held-out perplexity), in its own process alongside
  the LoRA runs (SmolLM2: bounded calibration, see MODELS).
Prints a table and writes bench/results/finetune.json (--out); children's logs go to .cache/bench_finetune/.

    nice -n 10 python bench/bench_finetune.py [--models stories260K,smollm2] [--steps N] [--skip-qat-smollm2]
        [--parts lora,merge,qat] [--qat-runs 4:qat,3:gptq,...] [--qat-jobs N]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # this tree's lowbit, not an installed one (children get it through PYTHONPATH)
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
MODELS = {
    "stories260K": {"path": str(SHARED / "models" / "stories260K"), "text": SHARED / "corpora" / "tinystories-valid.txt",
                    "group": 32, "lora": dict(steps=60, seq_len=128, batch=8, lr=4e-3, warmup=5),
                    "qat_calib": (64, 256), "eval_tokens": 16384},
    # bounded so that the whole SmolLM2 part runs in < 30 min on a busy 2-core machine
    "smollm2": {"path": "smollm2", "text": SHARED / "corpora" / "tinyshakespeare.txt", "group": 64,
                "lora": dict(steps=8, seq_len=128, batch=4, lr=3e-3, warmup=2),
                "qat_calib": (16, 256), "eval_tokens": 4096, "qat_eval_tokens": 4096},
}
MERGE_MODELS = ("stories260K",)
# (label, method, merge options): fresh grids as plain re-quantization does, the base's grid kept, and that
# distilled end to end towards the float merged model
MERGES = (("rtn, fresh grid", "rtn", {"keep_grid": False}),
          ("gptq, fresh grid", "gptq", {"keep_grid": False}),
          ("gptq, base grid kept", "gptq", {}),
          ("gptq, base grid kept + 128 distill steps", "gptq", {"distill_steps": 128}))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def base_model(name: str, base: str):
    """(model, tokenizer): the float model, quantized to `base` (float, rtn4, gptq4, nf4)."""
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model
    from lowbit.training.data import training_text

    spec = MODELS[name]
    model, tok = load_model(spec["path"])
    if base == "float":
        return model, tok
    config = {"rtn4": QuantizeConfig(method="rtn", bits=4, group_size=spec["group"]),
              "gptq4": QuantizeConfig(method="gptq", bits=4, group_size=spec["group"]),
              "nf4": QuantizeConfig(method="nf4", options={"double_quant": True, "compute_dtype": "fp32"})}[base]
    calib = training_text(tok, spec["text"]).windows(256, 32, 0) if base == "gptq4" else None
    quantize_model(model, config, calibration=calib, progress=False)
    return model, tok


def child_lora(name: str, base: str, out: str, steps: int | None) -> dict:
    """One LoRA run in this process: peak RSS of the process and while training."""
    from lowbit.training import finetune

    spec = MODELS[name]
    options = dict(spec["lora"], method="lora", eval_tokens=spec["eval_tokens"], checkpoint_every=0)
    if steps:
        options["steps"] = steps
    if base == "qlora":
        from lowbit.models.loading import load_model

        model, tok = load_model(spec["path"])
        options["method"] = "qlora"
    else:
        model, tok = base_model(name, base)
    loaded = peak_rss_mb()
    reset_peak()
    result = finetune(model, spec["text"], out, tokenizer=tok, progress=False, **options)
    figures = result.to_dict()
    figures.update(model=name, base=base, peak_rss_mb=peak_rss_mb(), peak_rss_after_load_mb=loaded)
    return figures


def run_child(*args: str, log_name: str) -> dict:
    return json.loads(start_child(*args, log_name=log_name).wait_json())


class Child:
    """A child process of this script; its stderr goes to a log file, its last stdout line is its JSON."""

    def __init__(self, args: tuple[str, ...], log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.args, self.log_path = args, log_path
        self.stderr = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_json(self) -> str:
        out, _ = self.process.communicate()
        self.stderr.close()
        if self.process.returncode:
            raise SystemExit(f"child {self.args} failed:\n{self.log_path.read_text()[-3000:]}")
        return out.strip().splitlines()[-1]


def start_child(*args: str, log_name: str) -> Child:
    return Child(args, ROOT / ".cache" / "bench_finetune" / f"{log_name}.log")


def merge_figures(name: str, lora: dict) -> list[dict]:
    from lowbit.training.api import held_out_perplexity, merge
    from lowbit.training.data import training_text

    spec = MODELS[name]
    base, tok = base_model(name, lora["base"])
    text = training_text(tok, spec["text"])
    held = text.held_out[: spec["eval_tokens"]]
    ctx = spec["lora"]["seq_len"]
    before, after = lora["perplexity_before"], lora["perplexity_after"]
    calib = text.windows(ctx, 128, 0)
    rows = []
    for label, method, options in MERGES:
        began = time.perf_counter()
        model = merge(copy.deepcopy(base), lora["output"], method=method, calibration=calib, tokenizer=tok, bits=4,
                      group_size=spec["group"], **options)
        ppl = held_out_perplexity(model, held, ctx)
        rows.append({"model": name, "base": lora["base"], "merge": f"{lora['base']} + lora -> {label}",
                     "lora_before": before, "lora_after": after, "perplexity": ppl,
                     "kept": (before - ppl) / (before - after), "seconds": time.perf_counter() - began})
        print(rows[-1], flush=True)
    return rows


# label -> (method, options): qat with its default start (GPTQ's codes) and from rounding to nearest
QAT_OPTIONS = {"rtn": ("rtn", {}), "gptq": ("gptq", {}), "qat": ("qat", {"epochs": 2}),
               "qat-rtn": ("qat", {"epochs": 2, "init": "rtn"}), "qat-lr3e-3": ("qat", {"epochs": 2, "lr": 3e-3}),
               "qat-gain5": ("qat", {"epochs": 2, "min_gain": 0.05}),
               # GPTQ recording one calibration window per call, as qat does (the gptq label batches 8)
               "gptq-chunk1": ("gptq", {"chunk": 1})}


def qat_runs(spec: str) -> list[tuple[int, str]]:
    """"4:rtn,3:qat,..." (or "all": 4, 3 and 2 bits x every QAT_OPTIONS label) -> [(bits, label)]."""
    if spec == "all":
        return [(bits, label) for bits in (4, 3, 2) for label in ("rtn", "gptq", "qat", "qat-rtn")]
    runs = []
    for item in spec.split(","):
        bits, _, method = item.partition(":")
        if method not in QAT_OPTIONS or not bits.isdigit():
            raise SystemExit(f"--qat-runs: {item!r} is not BITS:METHOD with METHOD one of {', '.join(QAT_OPTIONS)}")
        runs.append((int(bits), method))
    return runs


def qat_figures(name: str, runs: list[tuple[int, str]], with_float: bool = True) -> list[dict]:
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.training.api import held_out_perplexity
    from lowbit.training.data import training_text

    spec = MODELS[name]
    float_model, tok = base_model(name, "float")
    text = training_text(tok, spec["text"])
    held = text.held_out[: spec.get("qat_eval_tokens", spec["eval_tokens"])]
    n, length = spec["qat_calib"]
    calib = text.windows(length, n, 0)
    rows = []
    if with_float:
        rows.append({"model": name, "bits": 32, "method": "float",
                     "perplexity": held_out_perplexity(float_model, held, 256)})
    for bits, label in runs:
        model = copy.deepcopy(float_model)
        began = time.perf_counter()
        method, options = QAT_OPTIONS[label]
        quantize_model(model, QuantizeConfig(method=method, bits=bits, group_size=spec["group"], options=options),
                       calibration=calib, progress=False)
        row = {"model": name, "bits": bits, "method": label, "group_size": spec["group"],
               "perplexity": held_out_perplexity(model, held, 256), "seconds": time.perf_counter() - began,
               "settings": f"calibration {n} x {length}, held-out {held.numel()} tokens, ctx 256"}
        if method == "qat":     # which codes each block kept (keep_best): trained, start or gptq
            kept = {}
            for layer, report in model.lowbit_reports.items():
                kept.setdefault(layer.rsplit(".", 2)[0], report.kept)
            row["blocks_kept"] = {k: list(kept.values()).count(k) for k in ("trained", "start", "gptq")}
        rows.append(row)
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def start_qat(name: str, runs: list[tuple[int, str]], jobs: int, windows: int) -> list[Child]:
    """The qat/rtn/gptq quantizations in `jobs` child processes (round robin; the first also measures float);
    `windows` > 0 overrides the model's number of calibration windows."""
    shares = [runs[i::jobs] for i in range(min(jobs, len(runs)))]
    return [start_child("qat", name, ",".join(f"{b}:{m}" for b, m in share), str(int(i == 0)), str(windows),
                        log_name=f"{name}-qat{i}") for i, share in enumerate(shares)]


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(cell(r.get(c, "")) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="stories260K,smollm2")
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (default per model)")
    parser.add_argument("--skip-qat-smollm2", action="store_true", help="QAT/GPTQ at 4/3/2 bits on SmolLM2 is slow")
    parser.add_argument("--bases", default=None, help="LoRA bases to run (default all: float, rtn4, gptq4, nf4 and, "
                                                      "for smollm2, qlora)")
    parser.add_argument("--parts", default="lora,merge,qat", help="which measurements: lora, merge, qat")
    parser.add_argument("--qat-runs", default="all", help="BITS:METHOD,... of the qat comparison (default: 4, 3, 2 "
                                                          "bits x rtn, gptq, qat)")
    parser.add_argument("--qat-calib", type=int, default=0, help="calibration windows of the qat comparison "
                                                                 "(default per model, MODELS)")
    parser.add_argument("--qat-jobs", type=int, default=1, help="child processes the qat comparison is spread over")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    parser.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child is not None:
        if args.child[0] == "qat":
            _, name, runs, with_float, windows = args.child
            if int(windows):
                MODELS[name]["qat_calib"] = (int(windows), MODELS[name]["qat_calib"][1])
            print(json.dumps(qat_figures(name, qat_runs(runs), with_float == "1")))
            return
        name, base, out, steps = args.child
        row = json.dumps(child_lora(name, base, out, int(steps) or None))
        print(row, file=sys.stderr)     # also in the child's log
        print(row)
        return
    parts = set(args.parts.split(","))
    cache = ROOT / ".cache" / "bench_finetune"
    results: dict = {"lora": [], "merge": [], "qat": []}
    began = time.perf_counter()
    for name in args.models.split(","):
        # qat vs rtn/gptq in its own process while the LoRA runs go one after the other (peak RSS per process)
        skip_qat = "qat" not in parts or (name == "smollm2" and args.skip_qat_smollm2)
        qat = [] if skip_qat else start_qat(name, qat_runs(args.qat_runs), args.qat_jobs, args.qat_calib)
        bases = ("float", "rtn4", "gptq4", "nf4") + (("qlora",) if name == "smollm2" else ())
        bases = tuple(b for b in bases if b in args.bases.split(",")) if args.bases else bases
        for base in bases if "lora" in parts else ():
            row = run_child(name, base, str(cache / f"{name}-{base}"), str(args.steps or 0), log_name=f"{name}-{base}")
            results["lora"].append(row)
            print(row, flush=True)
        if name in MERGE_MODELS and {"merge", "lora"} <= parts:
            for base in ("rtn4", "gptq4"):
                lora = next(r for r in results["lora"] if r["model"] == name and r["base"] == base)
                results["merge"] += merge_figures(name, lora)
        for child in qat:
            results["qat"] += json.loads(child.wait_json())
        print(f"{name}: {time.perf_counter() - began:.0f} s so far", flush=True)
    results["seconds"] = time.perf_counter() - began
    for row in results["lora"]:
        row["base"] = {"float": "float (peft + transformers)", "qlora": "qlora: nf4 on load + 8-bit AdamW"}.get(
            row["base"], row["base"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results["lora"], ["model", "base", "perplexity_before", "perplexity_after", "seconds_per_step",
                                  "peak_rss_mb", "peak_rss_after_load_mb"]))
    print()
    print(table(results["merge"], ["model", "merge", "lora_before", "lora_after", "perplexity", "kept", "seconds"]))
    print()
    print(table(results["qat"], ["model", "bits", "method", "perplexity", "seconds"]))


if __name__ == "__main__":
    main()
