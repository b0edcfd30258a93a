"""Engine at real scale: lowbit vs llama.cpp on the same GGUF files, from 135M to 8B-class shapes.

For every (model, runner, threads) it starts a fresh process that loads the file, measures load time, pp128,
pp512 and tg128 (llama-bench style: random tokens, median of --reps), and its resident memory (VmRSS after the
runs, VmHWM peak), and prints one JSON line; the parent prints the table and writes
bench/results/scale.json. Runners alternate within each model, so machine noise hits both alike; the ratio
columns are the figures to read.

Models: `smollm2` (the packaged SmolLM2-135M Q4_1 GGUF), any real .gguf given with --gguf, and synthetic
random-weight models of real shapes (bench/synthetic.py: Qwen2.5-0.5B/1.5B, Llama-3.2-1B/3B, Llama-3-8B) as
Q4_0, Q4_K_M and Q8_0, and in lowbit's own layouts (`--mixes rtn4,gptq4`: 4-bit symmetric grid, groups of 128,
saved by lowbit's native and GPTQ writers; lowbit rows only), generated into .cache/models/ on first use (never
committed).

% of bandwidth = (bytes of weights read per generated token x tg tok/s) / memory read bandwidth, both measured
in this run (the weights read per token: every tensor but the token embedding, which a tied head reads instead).

Usage:
    python bench/bench_scale.py --models qwen2.5-0.5b,llama-3.2-1b --mixes Q4_K_M,Q8_0 --threads 2
    python bench/bench_scale.py --models smollm2 --gguf path/to/real.gguf --threads 1,2 --runners lowbit,llama.cpp
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / ".cache" / "models"


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB (10^6 bytes), the unit of the file sizes and the target. /proc counts kB of 1,024 bytes;
    results before 2026-12-03 (evening) divided by 1,024 only, i.e. gave MiB, 4.9% below MB."""
    status = Path("/proc/self/status").read_text()
    value = lambda key: int(status.split(f"{key}:")[1].split()[0]) * 1024 / 1e6  # noqa: E731
    return value("VmRSS"), value("VmHWM")


def worker(args: argparse.Namespace) -> None:
    """One runner on one file in this process; prints a JSON line."""
    began = time.perf_counter()
    result: dict = {"runner": args.worker, "threads": args.threads, "file": args.file}
    if args.worker == "lowbit":
        import torch

        from lowbit.engine.bench import bench_engine
        from lowbit.engine.runner import Engine
        from lowbit.models.loading import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.file, keep_quantized=True, engine_only=True)  # as `lowbit generate`
        # threads 0 ("auto"): the engine's default, all cores for prompts and a timed choice per decode step
        engine = Engine(model, tokenizer, context=max(args.pp) + args.tg + 16, threads=args.threads or None,
                        activations=args.activations)
        result["load_s"] = time.perf_counter() - began
        result["arithmetic"] = engine.arithmetic
        result["compiled_step"] = engine.fast_path and getattr(engine.decoder, "native", None) is not None
        rates = {}
        for pp in args.pp:
            rates[f"pp{pp}"] = bench_engine(engine, pp=pp, tg=0, reps=args.reps).pp_tok_s
        rates[f"tg{args.tg}"] = bench_engine(engine, pp=0, tg=args.tg, reps=args.reps).tg_tok_s
        result["context_tokens"] = engine.context
    else:
        import llama_cpp

        from lowbit.engine.bench import bench_llama_cpp

        args.threads = args.threads or os.cpu_count()    # llama.cpp's own default is every core
        llm = llama_cpp.Llama(model_path=args.file, n_ctx=16, n_threads=args.threads, verbose=False)
        result["load_s"] = time.perf_counter() - began
        del llm
        rates = {}
        for pp in args.pp:
            rates[f"pp{pp}"] = bench_llama_cpp(args.file, args.threads, pp=pp, tg=0, reps=args.reps).pp_tok_s
        rates[f"tg{args.tg}"] = bench_llama_cpp(args.file, args.threads, pp=0, tg=args.tg, reps=args.reps).tg_tok_s
    result.update(rates)
    result["rss_mb"], result["peak_rss_mb"] = _rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def kv_cache_bytes(path: Path, context: int) -> int:
    """Bytes of the float32 K and V caches the engine allocates for `context` tokens (GGUF header or config.json)."""
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        layers, width, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or width // heads
        return 2 * layers * kv_heads * head_dim * context * 4
    from lowbit.formats.gguf import read_gguf

    gf = read_gguf(path)
    arch = gf.get("general.architecture")
    layers, width = gf.get(f"{arch}.block_count"), gf.get(f"{arch}.embedding_length")
    heads = gf.get(f"{arch}.attention.head_count")
    kv_heads = gf.get(f"{arch}.attention.head_count_kv") or heads
    head_dim = gf.get(f"{arch}.attention.key_length") or width // heads
    return 2 * layers * kv_heads * head_dim * context * 4


class BusyMachine:
    """`n` processes spinning on the CPU (at normal priority) while a measurement runs: a user's busy laptop."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def weight_bytes_per_token(path: Path) -> tuple[int, int, bool]:
    """(bytes of weights one decode step reads, KV-cache-free file tensor bytes, tied) from the file headers."""
    if path.is_dir():    # a safetensors checkpoint folder (lowbit's own layouts)
        from safetensors import safe_open

        sizes = {}
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    count = 1
                    for d in part.get_shape():
                        count *= d
                    sizes[name] = count * {"F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(part.get_dtype(), 1)
        tied = not any(name.startswith("lm_head.") for name in sizes)
        read = sum(size for name, size in sizes.items() if "embed_tokens" not in name or tied)
        return read, sum(sizes.values()), tied
    from lowbit.formats.gguf import read_gguf

    gf = read_gguf(path)
    tied = "output.weight" not in gf.tensors
    total = sum(t.data.size for t in gf.tensors.values())
    read = sum(t.data.size for name, t in gf.tensors.items() if name != "token_embd.weight" or tied)
    return read, total, tied


def model_files(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """(model label, mix, path) for the requested matrix, generating synthetic files that are missing."""
    from real_models import PACKAGED, real_model_path
    from synthetic import LOWBIT_LAYOUTS, SHAPES, write_synthetic_gguf, write_synthetic_lowbit

    from lowbit.models.loading import resolve_model_path

    files = []
    for name in args.models.split(","):
        if name == "smollm2":
            files.append(("SmolLM2-135M (real)", "Q4_1", resolve_model_path("smollm2")))
            continue
        if name in PACKAGED:
            files.append((PACKAGED[name].label, "file", real_model_path(name)))
            continue
        if name not in SHAPES:
            raise SystemExit(f"unknown model {name!r}: use smollm2, one of {', '.join(PACKAGED)} (real models "
                             f"PyPI packages ship) or a synthetic shape: {', '.join(SHAPES)}")
        for mix in args.mixes.split(","):
            # lowbit layouts: float tensors from a float32 source (the original files) or a half one
            suffix = "" if args.float_dtype == "float32" else f"-{args.float_dtype}"
            path = CACHE / (f"{name}-{mix}{suffix}" if mix in LOWBIT_LAYOUTS else f"{name}-{mix}.gguf")
            if not path.exists():
                print(f"generating {path} ...", file=sys.stderr)
                if mix in LOWBIT_LAYOUTS:
                    write_synthetic_lowbit(path, name, mix, float_dtype=args.float_dtype)
                else:
                    write_synthetic_gguf(path, name, mix)
            files.append((f"{name} (synthetic)", mix, path))
    for extra in args.gguf or []:
        files.append((f"{Path(extra).stem} (real)", "file", Path(extra)))
    return files


def run_worker(runner: str, path: Path, threads: int, args: argparse.Namespace, activations: str | None
               ) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", runner, "--file", str(path), "--threads", str(threads),
           "--pp", ",".join(map(str, args.pp)), "--tg", str(args.tg), "--reps", str(args.reps)]
    if activations:
        cmd += ["--activations", activations]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or os.cpu_count()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {runner} t{threads} on {path.name}: timed out after {args.timeout} s", file=sys.stderr)
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {runner} t{threads} on {path.name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b,llama-3.2-1b")
    parser.add_argument("--mixes", default="Q4_K_M")
    parser.add_argument("--gguf", action="append", help="a real .gguf file to add to the matrix")
    parser.add_argument("--threads", default="2",
                        help="comma-separated thread counts; 'auto' (0) leaves lowbit its default (all cores for "
                             "prompts, decode threads chosen by timing) and gives llama.cpp every core")
    parser.add_argument("--runners", default="lowbit,llama.cpp")
    parser.add_argument("--activations", default="auto",
                        help="comma-separated arithmetics lowbit runs with (auto, float32, int8: `lowbit "
                             "--activations`), one lowbit row each")
    parser.add_argument("--float-dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"),
                        help="synthetic lowbit files: the dtype their float tensors come from (real checkpoints "
                             "are bfloat16; float32 reads the files made before half heads)")
    parser.add_argument("--pp", default="128,512")
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    parser.add_argument("--busy", type=int, default=0,
                        help="also measure every runner with this many CPU-spinning processes running (a busy "
                             "machine); the 'busy / quiet' rows are the ratios")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pp = [int(p) for p in str(args.pp).split(",") if p]
    from lowbit.runtime.activations import Activations

    activations = [Activations.parse(a).value for a in args.activations.split(",") if a]
    if args.worker:
        args.activations = activations[0]
        args.threads = int(args.threads)
        return worker(args)
    args.threads = args.threads.replace("auto", "0")

    from lowbit.engine.bench import llama_cpp_available, memory_read_bandwidth
    from lowbit.eval.report import format_table, write_json

    runners = args.runners.split(",")
    if "llama.cpp" in runners and not llama_cpp_available():
        print("llama-cpp-python is not installed (make llama-cpp): lowbit only", file=sys.stderr)
        runners.remove("llama.cpp")
    thread_counts = [int(t) for t in args.threads.split(",")]
    bandwidth = {t: memory_read_bandwidth(t or os.cpu_count()) for t in thread_counts}
    print("memory read bandwidth: " + ", ".join(f"{bw:.1f} GB/s at {t} threads" for t, bw in bandwidth.items()))
    rows, raw = [], []
    for label, mix, path in model_files(args):
        read, total, tied = weight_bytes_per_token(path)
        for threads in thread_counts:
            measured, first_row = {}, len(rows)
            # (runner, its row name, lowbit's activations, busy processes): runners alternate within a model
            variants = [(r, f"lowbit {a}", a, 0) for r in runners if r == "lowbit" for a in activations]
            # llama.cpp reads GGUF only: lowbit's own layouts (folders) are lowbit's rows alone
            variants += [(r, r, None, 0) for r in runners if r != "lowbit" and not path.is_dir()]
            if args.busy:
                variants += [(r, f"{name} busy x{args.busy}", a, args.busy) for r, name, a, _ in variants]
            for runner, name, arithmetic, busy in variants:
                with BusyMachine(busy):
                    result = run_worker(runner, path, threads, args, arithmetic)
                if result is None:
                    continue
                measured[name] = result
                tg = result.get(f"tg{args.tg}")
                row = {"model": label, "mix": mix, "file_mb": total / 1e6, "runner": name,
                       "threads": threads or "auto",
                       "load_s": result["load_s"], "rss_mb": result["rss_mb"], "peak_mb": result["peak_rss_mb"],
                       "rss_per_file": result["rss_mb"] * 1e6 / total,
                       "rss_target_mb": (1.15 * total + kv_cache_bytes(path, result.get("context_tokens") or
                                                                          max(args.pp) + args.tg + 16)) / 1e6 + 150,
                       "bw_pct": 100 * read * (tg or 0) / (bandwidth[threads] * 1e9)}
                for pp in args.pp:
                    row[f"pp{pp}"] = result.get(f"pp{pp}")
                row["tg"] = tg
                rows.append(row)
                raw.append({**row, "raw": result, "weight_bytes_per_token": read, "tied": tied})
            for runner in [name for _, name, _, busy in variants if not busy]:
                quiet, loaded = measured.get(runner), measured.get(f"{runner} busy x{args.busy}")
                if quiet and loaded:
                    rows.append({"model": label, "mix": mix, "runner": f"{runner} busy / quiet",
                                 "threads": threads or "auto",
                                 **{("tg" if k.startswith("tg") else k): (loaded.get(k) or 0) / quiet[k]
                                    for k in quiet if k.startswith(("pp", "tg")) and quiet[k]}})
            theirs = measured.get("llama.cpp")
            for name in [f"lowbit {a}" for a in activations if f"lowbit {a}" in measured and theirs]:
                ours = measured[name]
                ratio = {k: (ours.get(k) or 0) / theirs[k] for k in theirs if k.startswith(("pp", "tg")) and theirs[k]}
                rows.append({"model": label, "mix": mix, "runner": f"{name} / llama.cpp",
                             "threads": threads or "auto",
                             **{("tg" if k.startswith("tg") else k): v for k, v in ratio.items()}})
            print(format_table(rows[first_row:], _columns(args)), flush=True)
    print()
    print(format_table(rows, _columns(args)))
    write_json(args.out, {"bandwidth_gb_s": bandwidth, "argv": sys.argv[1:], "rows": raw})
    print(f"wrote {args.out}")


def _columns(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    columns = [("model", "model", "s"), ("mix", "mix", "s"), ("file_mb", "file MB", ".0f"), ("runner", "runner", "s"),
               ("threads", "thr", ""), ("load_s", "load s", ".1f")]
    columns += [(f"pp{pp}", f"pp{pp}", ".2f") for pp in args.pp]
    columns += [("tg", f"tg{args.tg}", ".2f"), ("bw_pct", "% bw", ".0f"), ("rss_mb", "RSS MB", ".0f"),
                ("rss_target_mb", "RSS target", ".0f"), ("rss_per_file", "RSS/file", ".2f")]
    return columns


if __name__ == "__main__":
    main()
