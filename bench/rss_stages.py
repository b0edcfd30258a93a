"""Where a running lowbit model's resident memory goes, stage by stage, in one process.

Stages: interpreter start, `import torch`, lowbit's engine modules (and what they import), load_model(path,
keep_quantized=True), Engine(context=pp+tg+16), a prefill of --pp random tokens, --tg greedy decode steps (as
bench_scale.py's worker runs them). For each stage it records VmRSS split into anonymous and file pages
(/proc/self/status), glibc's heap (mallinfo2: bytes in use, bytes free but kept, bytes in mmapped chunks), the
bytes of torch tensors the model and engine hold, and at the end the largest mappings of /proc/self/smaps.

Usage:
    python bench/rss_stages.py .cache/models/qwen2.5-0.5b-real.gguf --threads 2
    python bench/rss_stages.py smollm2 --pp 512 --tg 128 --json bench/results/rss_stages_smollm2.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_mb() -> dict[str, float]:
    """glibc's main+thread arenas: in use, free but kept, and mmapped chunks (MB); {} without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {"heap_used": info.uordblks / 2**20, "heap_free": info.fordblks / 2**20, "mmapped": info.hblkhd / 2**20}


def status_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def tensor_mb(*roots) -> float:
    """MB of distinct tensor storages reachable as attributes of `roots` (model parameters, buffers, engine state),
    anonymous memory only: storages that view a memory-mapped file are left out."""
    import torch

    seen: dict[int, int] = {}

    def visit(obj, depth=0):
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t, depth + 1)
            for value in vars(obj).values():
                if not isinstance(value, (torch.nn.Module, dict)):
                    visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lowbit"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for root in roots:
        visit(root)
    mapped = file_mapped_ranges()
    return sum(size for ptr, size in seen.items() if not any(lo <= ptr < hi for lo, hi in mapped)) / 2**20


def file_mapped_ranges() -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def biggest_mappings(count: int = 12) -> list[tuple[str, float, float]]:
    """(name, Rss MB, Anonymous MB) of the largest resident mappings, same-named ones summed."""
    totals: dict[str, list[float]] = {}
    name = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) >= 6 else "[anon]"
            totals.setdefault(name, [0.0, 0.0])
        elif head[0] == "Rss:":
            totals[name][0] += int(head[1]) / 1024
        elif head[0] == "Anonymous:":
            totals[name][1] += int(head[1]) / 1024
    rows = sorted(((n, r, a) for n, (r, a) in totals.items()), key=lambda row: -row[1])
    return rows[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    stages = []
    roots: list = []

    def stage(name: str) -> None:
        row = {"stage": name, **status_mb(), **heap_mb()}
        if roots:
            row["tensors"] = tensor_mb(*roots)
        stages.append(row)

    stage("start")
    import torch

    torch.set_num_threads(args.threads)
    stage("import torch")
    from lowbit.engine.bench import bench_tokens
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    stage("import lowbit engine")
    began = time.perf_counter()
    model, tokenizer = load_model(args.model, keep_quantized=True, engine_only=True)  # as `lowbit generate`
    roots.append(model)
    stage(f"load_model ({time.perf_counter() - began:.1f} s)")
    engine = Engine(model, tokenizer, context=args.pp + args.tg + 16, threads=args.threads)
    roots.append(engine.decoder)
    stage("Engine")
    prompt = bench_tokens(model.config.vocab_size, args.pp)
    engine.release(engine.start(prompt, SamplingParams(max_new_tokens=1, temperature=0.0)))
    stage(f"prefill pp{args.pp}")
    seq = engine.start(prompt[:1], SamplingParams(max_new_tokens=args.tg, temperature=0.0), stop_on_eos=False)
    while not seq.finished:
        engine.step()
    engine.release(seq)
    stage(f"decode tg{args.tg}")
    columns = ["VmRSS", "RssAnon", "RssFile", "heap_used", "heap_free", "mmapped", "tensors", "VmHWM"]
    print(f"{'stage':28s}" + "".join(f"{c:>10s}" for c in columns))
    for row in stages:
        print(f"{row['stage']:28s}" + "".join(f"{row.get(c, float('nan')):10.0f}" for c in columns))
    print("\nlargest mappings (MB resident, anonymous):")
    mappings = biggest_mappings()
    for name, rss, anon in mappings:
        print(f"  {rss:8.1f} {anon:8.1f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "stages": stages,
                                               "mappings": mappings}, indent=1))


if __name__ == "__main__":
    main()
