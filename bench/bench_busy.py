"""How lowbit degrades on a busy machine: the same jobs timed quiet and with N processes spinning on the cores.

Jobs (each in its own process, as a user runs it):
- `demo`: `python -m lowbit.demo` (what `make demo` runs after setup: quantize SmolLM2 RTN-4, save, reload,
  evaluate both models, generate from both). The issue's case: it took over 25 minutes at load 5 when OpenMP threads
  spun at barriers.
- `generate`: `lowbit generate MODEL -n 64` with a prompt of about 128 tokens (load, prompt and decode).
- `bench`: `lowbit bench MODEL -p 128 -n 64 -r 1` (prompt and decode speed, load excluded).

Each job runs quiet, then under each --busy count, alternating rounds (quiet, busy, quiet, busy ...) so drift in the
machine's other load hits both; the table gives wall seconds and busy / quiet. With N spinners on C cores a job using
all C cores can at best keep C / (C + N) of them under the kernel's fair sharing, i.e. be (C + N) / C times slower:
the "fair" column.

Usage:
    python bench/bench_busy.py --busy 4 --jobs demo,generate,bench --model FILE.gguf --rounds 2 --out RESULTS.json
    python bench/bench_busy.py ... --checkouts /path/to/old,/path/to/new   (side by side: each round runs every
        checkout's job quiet and busy in turn, so the machine's drift hits all of them alike)

Each job runs once untimed first (page cache, compiled kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_scale import BusyMachine  # noqa: E402

PROMPT = " ".join(["The river ran past the old mill and the children watched the water turn the wheel."] * 7)


def job_command(job: str, model: str, out: Path) -> list[str]:
    lowbit = [sys.executable, "-m", "lowbit"]
    if job == "demo":
        return [sys.executable, "-m", "lowbit.demo", "--out", str(out / "demo")]
    if job == "generate":
        return [*lowbit, "generate", model, "-p", PROMPT, "-n", "64", "--temperature", "0"]
    if job == "bench":
        return [*lowbit, "bench", model, "-p", "128", "-n", "64", "-r", "1", "--json", str(out / "bench.json")]
    raise SystemExit(f"unknown job {job!r}: demo, generate, bench")


def run(command: list[str], timeout: float, out: Path, checkout: Path = ROOT) -> dict:
    """One timed run of `checkout`'s lowbit; a failed or timed-out run is recorded with its status and left out of
    the summary."""
    began = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=checkout,
                                env=dict(os.environ, PYTHONPATH=str(checkout)))
    except subprocess.TimeoutExpired:
        return {"wall_s": round(time.perf_counter() - began, 2), "status": "timeout"}
    row = {"wall_s": round(time.perf_counter() - began, 2), "status": result.returncode}
    if result.returncode:
        row["error"] = result.stderr.strip().splitlines()[-1:]
    bench = out / "bench.json"
    if "bench" in command and bench.exists():
        speed = json.loads(bench.read_text())["results"][0]
        row.update(pp_tok_s=speed.get("pp_tok_s"), tg_tok_s=speed.get("tg_tok_s"))
        bench.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="demo,generate,bench")
    parser.add_argument("--model", default="smollm2", help="model for generate and bench (default: smollm2)")
    parser.add_argument("--busy", default="4", help="spinning processes, comma-separated counts")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", required=True, help="results JSON (must not exist)")
    parser.add_argument("--checkouts", default=str(ROOT),
                        help="comma-separated lowbit checkouts to compare side by side (default: this one)")
    args = parser.parse_args()
    checkouts = [Path(c).resolve() for c in args.checkouts.split(",") if c.strip()]
    for checkout in checkouts:
        if not (checkout / "lowbit" / "__init__.py").exists():
            raise SystemExit(f"{checkout} is not a lowbit checkout (no lowbit/__init__.py)")
    if len(set(checkouts)) != len(checkouts):
        raise SystemExit(f"--checkouts names a checkout twice: {args.checkouts}")
    out_path = Path(args.out)
    if out_path.exists():
        raise SystemExit(f"{out_path} exists: results are never overwritten")
    cores = os.cpu_count() or 1
    busy_counts = [int(n) for n in args.busy.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-busy-") as tmp:
        work = Path(tmp)
        for job in args.jobs.split(","):
            command = job_command(job, args.model, work)
            for checkout in checkouts:   # untimed: page cache and compiled kernels warm for the first round
                run(command, args.timeout, work, checkout)
            for round_index in range(args.rounds):
                # every other round in reverse, so that no checkout always runs right after another's busy run
                for checkout in checkouts if round_index % 2 == 0 else checkouts[::-1]:
                    for busy in [0, *busy_counts]:
                        if busy:
                            with BusyMachine(busy):
                                row = run(command, args.timeout, work, checkout)
                        else:
                            row = run(command, args.timeout, work, checkout)
                        row.update(job=job, busy=busy, round=round_index, checkout=str(checkout))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print(f"\n{'checkout':24s}{'job':10s}{'busy':>6s}{'wall s':>10s}{'x quiet':>9s}{'fair':>7s}{'pp tok/s':>10s}"
          f"{'tg tok/s':>10s}{'pp x':>7s}{'tg x':>7s}")
    summary = []
    ok = [r for r in rows if r["status"] == 0]
    for number, checkout in enumerate(map(str, checkouts)):
        label = f"{number}:{Path(checkout).name}"[:23]
        for job in args.jobs.split(","):
            quiet_rates = [r for r in ok if r["checkout"] == checkout and r["job"] == job and r["busy"] == 0]
            if not quiet_rates:
                print(f"{label:23s} {job:10s} no successful quiet run: see the rows above")
                continue
            quiet = statistics.median(r["wall_s"] for r in quiet_rates)
            for busy in [0, *busy_counts]:
                mine = [r for r in ok if r["checkout"] == checkout and r["job"] == job and r["busy"] == busy]
                if not mine:
                    print(f"{label:23s} {job:10s}{busy:6d}  no successful run")
                    continue
                wall = statistics.median(r["wall_s"] for r in mine)
                rates = {k: statistics.median(r[k] for r in mine) if all(r.get(k) for r in mine) else None
                         for k in ("pp_tok_s", "tg_tok_s")}
                fair = (cores + busy) / cores
                entry = {"checkout": checkout, "job": job, "busy": busy, "wall_s": wall,
                         "slowdown": round(wall / quiet, 2), "fair_slowdown": round(fair, 2), **rates}
                for rate in ("pp", "tg"):
                    if busy and rates[f"{rate}_tok_s"] and all(r.get(f"{rate}_tok_s") for r in quiet_rates):
                        entry[f"{rate}_slowdown"] = round(statistics.median(r[f"{rate}_tok_s"] for r in quiet_rates)
                                                          / rates[f"{rate}_tok_s"], 2)
                summary.append(entry)
                print(f"{label:23s} {job:10s}{busy:6d}{wall:10.1f}{wall / quiet:9.2f}{fair:7.2f}"
                      f"{rates['pp_tok_s'] or float('nan'):10.1f}{rates['tg_tok_s'] or float('nan'):10.1f}"
                      f"{entry.get('pp_slowdown', float('nan')):7.2f}{entry.get('tg_slowdown', float('nan')):7.2f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"argv": sys.argv, "cores": cores, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
