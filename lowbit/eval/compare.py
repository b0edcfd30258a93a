"""`lowbit compare`: quantize one model several ways (or take given files), evaluate each against the float model,
and print one table: bits per weight, file size, resident memory, perplexity, KLD, top-1, task accuracy (and
relative to float), prefill and decode speed (and relative to float); JSON, CSV and a PNG beside it.

Each method is quantized by `lowbit quantize` and evaluated in a process of its own, so its resident memory is
its own (the float reference is loaded after that reading) and a crash or Ctrl-C loses one method at most. Results
are written to DIR/compare.json after every method, and a rerun skips the methods already there (resumable).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

DEFAULT_METHODS = "rtn4,gptq4,awq4,nf4,Q4_K_M,Q8_0,int8"
FLOAT = "float"
GGUF_TYPE = re.compile(r"^(I?Q\d\w*|F16|BF16|F32)$")
GRID_METHOD = re.compile(r"^(rtn|gptq|awq)(\d)$")
CALIBRATED = ("gptq", "awq")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a name, and either a given file or the `lowbit quantize` arguments making one."""

    name: str
    quantize_args: tuple[str, ...] = ()
    given: Path | None = None
    gguf: bool = False

    def output(self, out_dir: Path) -> Path:
        if self.given is not None:
            return self.given
        return out_dir / "models" / (f"{self.name}.gguf" if self.gguf else self.name)


def parse_method(text: str) -> MethodSpec:
    """rtn4 / gptq3 / awq4 (method + bits), a GGUF type (Q4_K_M, Q8_0, ...), another lowbit method (nf4, int8,
    dynamic-int8, ...), or NAME=PATH for a file made elsewhere."""
    text = text.strip()
    if "=" in text:
        name, path = text.split("=", 1)
        if not Path(path).exists():
            raise LowbitError(f"method {name}: {path} does not exist; give NAME=PATH of a model file or folder")
        return MethodSpec(name, given=Path(path))
    if text == FLOAT:
        raise LowbitError("the float model is always compared; leave 'float' out of --methods")
    grid = GRID_METHOD.match(text)
    if grid:
        return MethodSpec(text, ("--method", grid.group(1), "--bits", grid.group(2)))
    if GGUF_TYPE.match(text):
        return MethodSpec(text, ("--format", "gguf", "--type", text), gguf=True)
    from lowbit.methods.base import known_methods

    if text not in known_methods():
        raise LowbitError(f"unknown method {text!r} in --methods: use rtnB/gptqB/awqB, a GGUF type (Q4_K_M, Q8_0, "
                          f"...), one of {', '.join(known_methods())}, or NAME=PATH")
    return MethodSpec(text, ("--method", text))


def parse_methods(text: str) -> list[MethodSpec]:
    specs = [parse_method(part) for part in text.split(",") if part.strip()]
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise LowbitError(f"--methods must name each method once, and it names {names}")
    return specs


# -- one method, in its own process -----------------------------------------------------------------------------
def evaluate_one(model: str, base: str | None, data: str, ctx: int, max_tokens: int, task_items: int,
                 name: str, speed: bool = True) -> dict[str, Any]:
    """Every figure of one row. Runs in a worker process (resident memory is read after loading `model`)."""
    import torch

    from lowbit.eval.footprint import current_rss_bytes
    from lowbit.eval.perplexity import tokenize_text
    from lowbit.eval.report import evaluate
    from lowbit.eval.tasks import items_from_file, score_items
    from lowbit.calibration.text import read_text
    from lowbit.models.loading import load_model, resolve_model_path
    from lowbit.runtime.cpu import float32_arithmetic

    t0 = time.perf_counter()
    # The float row is the reference as the methods see it (a GGUF source dequantized to float32), so its blocks
    # are not kept; a method's file keeps its quantized layers, as a user runs it.
    quantized, tokenizer = load_model(model, keep_quantized=base is not None)
    load_seconds = time.perf_counter() - t0
    resident = current_rss_bytes()
    reference = load_model(base)[0] if base else None
    tokens = tokenize_text(tokenizer, read_text(data, "evaluation text"), max_tokens)
    row = evaluate(quantized, tokens, name, ctx=ctx, base=reference, path=None if base is None else
                   resolve_model_path(model), progress=False, speed=speed).to_dict()
    del reference
    with float32_arithmetic(), torch.no_grad():
        tasks = score_items(quantized, tokenizer, items_from_file(data, task_items), progress=False)
    row.update({"resident_mb": resident / 1e6, "load_seconds": load_seconds,
                "last_word_accuracy": tasks["last_word"].accuracy, "cloze_accuracy": tasks["cloze"].accuracy,
                "task_items": task_items})
    return row


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lowbit.eval.compare worker")
    p.add_argument("--model", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--task-items", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    row = evaluate_one(a.model, a.base, a.data, a.ctx, a.max_tokens, a.task_items, a.name, speed=not a.no_speed)
    Path(a.out).write_text(json.dumps(row))
    return 0


def _run(cmd: list[str], log_file: Path, what: str) -> None:
    with open(log_file, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:]
        raise LowbitError(f"{what} failed ({tail[0] if tail else 'no output'}); see {log_file}")


# -- the whole run ---------------------------------------------------------------------------------------------
@dataclass
class CompareSettings:
    model: str
    methods: list[MethodSpec]
    data: Path
    out: Path
    calib: Path | None = None
    calib_samples: int = 32
    ctx: int = 512
    max_tokens: int = 8192
    task_items: int = 100
    speed: bool = True


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"results": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{path} is not a compare result ({exc}); delete it to start over") from None
    if not isinstance(data.get("results"), dict):
        raise LowbitError(f"{path} is not a compare result (no 'results'); delete it to start over")
    return data


def run_compare(s: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Quantize and evaluate every method not yet in OUT/compare.json, then write the table files."""
    from tqdm.auto import tqdm

    from lowbit.eval.report import write_json
    from lowbit.models.paths import resolve_model_path

    s.out.mkdir(parents=True, exist_ok=True)
    json_path = s.out / "compare.json"
    data = load_results(json_path)
    settings = {"model": str(s.model), "data": str(s.data), "ctx": s.ctx, "max_tokens": s.max_tokens,
                "task_items": s.task_items, "calib": str(s.calib) if s.calib else None,
                "calib_samples": s.calib_samples, "compute": "float32"}
    if data["results"] and data.get("settings", settings) != settings:
        raise LowbitError(f"{json_path} holds results measured with other settings ({data.get('settings')}); use "
                          "another -o folder or delete it")
    data["settings"] = settings
    results: dict[str, Any] = data["results"]
    model_path = str(resolve_model_path(s.model))
    todo = [m for m in [MethodSpec(FLOAT), *s.methods] if m.name not in results]
    steps = sum(1 if m.given is not None or m.name == FLOAT else 2 for m in todo)
    bar = tqdm(total=steps, desc="compare", unit="step", disable=not progress)
    logs = s.out / "logs"
    logs.mkdir(exist_ok=True)
    for spec in todo:
        log_file = logs / f"{spec.name}.log"
        target = model_path if spec.name == FLOAT else spec.output(s.out)
        if spec.name != FLOAT and spec.given is None:
            bar.set_postfix_str(f"quantize {spec.name}")
            cmd = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", model_path, "-o", str(target),
                   *spec.quantize_args]
            if any(m in spec.quantize_args for m in CALIBRATED):
                cmd += ["--calib-samples", str(s.calib_samples)] + (["--calib", str(s.calib)] if s.calib else [])
            started = time.perf_counter()
            _run(cmd, log_file, f"quantizing {spec.name}")
            quantize_seconds = time.perf_counter() - started
            bar.update(1)
        else:
            quantize_seconds = None
        bar.set_postfix_str(f"evaluate {spec.name}")
        row_file = logs / f"{spec.name}.json"
        cmd = [sys.executable, "-m", "lowbit.eval.compare", "worker", "--model", str(target), "--data", str(s.data),
               "--ctx", str(s.ctx), "--max-tokens", str(s.max_tokens), "--task-items", str(s.task_items),
               "--name", spec.name, "--out", str(row_file)]
        if spec.name != FLOAT:
            cmd += ["--base", model_path]
        if not s.speed:
            cmd.append("--no-speed")
        _run(cmd, log_file, f"evaluating {spec.name}")
        row = json.loads(row_file.read_text())
        row["quantize_seconds"] = quantize_seconds
        row["file"] = str(target)
        results[spec.name] = row
        write_json(json_path, data)           # after every method: a rerun resumes from here
        bar.update(1)
    bar.close()
    order = [FLOAT, *[m.name for m in s.methods]]
    rows = with_relative_figures([results[name] for name in order if name in results])
    write_csv(s.out / "compare.csv", rows)
    plot(rows, s.out / "compare.png", title=f"{Path(s.model).name}: {s.data.name}")
    return {"settings": settings, "rows": rows}


def with_relative_figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with task accuracy and speeds relative to the float row (the first)."""
    base = rows[0]
    out = []
    for row in rows:
        row = dict(row)
        for key, rel in (("last_word_accuracy", "last_word_relative"), ("cloze_accuracy", "cloze_relative"),
                         ("prompt_tokens_per_s", "prefill_relative"), ("decode_tokens_per_s", "decode_relative")):
            b, v = base.get(key), row.get(key)
            row[rel] = v / b if b and v is not None else None
        row["size_mb"] = row.get("size_mb")
        out.append(row)
    return out


COMPARE_COLUMNS = [("name", "method", "s"), ("bits_per_weight", "bpw", ".2f"), ("size_mb", "file MB", ".1f"),
                   ("resident_mb", "RSS MB", ".0f"), ("perplexity", "ppl", ".3f"), ("kld", "KLD", ".4f"),
                   ("top1_agreement", "top-1", ".3f"), ("last_word_accuracy", "last-word", ".3f"),
                   ("last_word_relative", "rel", ".2f"), ("cloze_accuracy", "cloze", ".3f"),
                   ("cloze_relative", "rel", ".2f"), ("prompt_tokens_per_s", "prefill t/s", ".1f"),
                   ("prefill_relative", "x float", ".2f"), ("decode_tokens_per_s", "decode t/s", ".1f"),
                   ("decode_relative", "x float", ".2f")]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k, _, _ in COMPARE_COLUMNS] + sorted({k for r in rows for k in r} - {k for k, _, _ in COMPARE_COLUMNS})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in keys})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (smaller is better), by the first."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """size vs perplexity (Pareto front drawn) and prefill/decode speed bars; None when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed, so no plot: pip install 'lowbit[plot]'")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    points = [(r["size_mb"], r["perplexity"]) for r in rows]
    left.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
    for name, (x, y) in zip(names, points):
        left.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points)
    left.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:orange", zorder=2,
              label="Pareto front")
    left.set_xscale("log")
    left.set_xlabel("file size (MB, log)")
    left.set_ylabel("perplexity")
    left.set_title(f"size vs perplexity {title}", fontsize=9)
    left.legend(fontsize=8)
    speeds = [(r.get("prompt_tokens_per_s") or 0, r.get("decode_tokens_per_s") or 0) for r in rows]
    x = range(len(rows))
    width = 0.4
    right.bar([i - width / 2 for i in x], [s[0] for s in speeds], width, label="prefill tok/s")
    right.bar([i + width / 2 for i in x], [s[1] for s in speeds], width, label="decode tok/s")
    right.set_xticks(list(x), names, rotation=30, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("tokens/s (log)")
    right.set_title("speed (batch 1)", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- CLI ---------------------------------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="quantize a model several ways and compare size, quality, accuracy, speed")
    p.add_argument("model", help="HF folder, .gguf file or packaged name (smollm2): the float reference")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated: rtnB/gptqB/awqB, GGUF types, lowbit methods, or NAME=PATH for given "
                        f"files (default {DEFAULT_METHODS})")
    p.add_argument("--data", required=True, help="evaluation text (perplexity, KLD, top-1, task items)")
    p.add_argument("--calib", default=None, help="calibration text for gptq/awq (default: self-generated)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of --data for perplexity/KLD")
    p.add_argument("--task-items", type=int, default=100, help="last-word and cloze items built from --data")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("-o", "--output", required=True, help="folder for the files, compare.json/.csv/.png (resumable)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    from lowbit.eval.report import format_table

    settings = CompareSettings(model=args.model, methods=parse_methods(args.methods), data=Path(args.data),
                               out=Path(args.output), calib=Path(args.calib) if args.calib else None,
                               calib_samples=args.calib_samples, ctx=args.ctx, max_tokens=args.max_tokens,
                               task_items=args.task_items, speed=not args.no_speed)
    if not settings.data.is_file():
        raise LowbitError(f"--data {settings.data} not found; give a text file")
    report = run_compare(settings)
    print(format_table(report["rows"], COMPARE_COLUMNS))
    print(f"wrote {settings.out / 'compare.json'}, compare.csv, compare.png")


def add_commands(sub) -> None:
    add_compare(sub)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        try:
            sys.exit(_worker(sys.argv[2:]))
        except LowbitError as exc:
            print(f"lowbit: error: {exc}", file=sys.stderr)
            sys.exit(2)
    sys.exit("usage: python -m lowbit.eval.compare worker ... (use `lowbit compare`)")
