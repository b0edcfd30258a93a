"""GPTQ and AWQ against RTN on the same grid, plus the memory of layer-wise streaming.

For stories260K and SmolLM2-135M (dequantized from its packaged Q4_1 GGUF): perplexity on wikitext-2 test and
TinyStories (first tokens, ctx 512, non-overlapping windows; EVAL_TOKENS per model) for fp32, RTN, GPTQ and AWQ
at 4-bit g128 and 3-bit g128 (asymmetric: AWQ's grid; RTN and GPTQ use the same), quantization wall time and
peak RSS (each configuration runs in its own process, so its peak RSS is its own). Calibration windows come half
from wikitext-2 test beyond its first 200k characters and half from TinyStories beyond its first 300k, disjoint
from the evaluation tokens (checked); `--seeds 0,1,2` repeats every calibrated method with other calibration
samples and prints the spread.

Streaming: peak RSS of `stream_quantize` (one block in memory at a time) on SmolLM2 saved as an HF folder and
on a generated random Llama checkpoint much larger than that peak, next to the model's fp32 size. With
`--mem-limit-gb X` every streaming child runs under an address-space limit (RLIMIT_AS, which counts every
mapping, so it is stricter than a limit on resident memory) of X GiB, and a control child tries to load the
synthetic model whole under the same limit: it must fail where the streamed quantization succeeds.

    python bench/bench_gptq_awq.py                 # everything (about an hour on 2 busy cores)
    python bench/bench_gptq_awq.py --models stories --no-streaming --seeds 0,1,2   # three minutes
    python bench/bench_gptq_awq.py --models stories --no-quality --synthetic-layers 24 --mem-limit-gb rtn=2,gptq=4 \
        --out bench/results/gptq_awq_streaming_synthetic.json   # a 5.1 GiB fp32 model streamed under 2 / 4 GiB
Writes bench/results/gptq_awq.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results" / "gptq_awq.json"
WIKI = SHARED / "corpora" / "wikitext2-raw-test.txt"
TINY = SHARED / "corpora" / "tinystories-valid.txt"
MODELS = {"stories": str(SHARED / "models" / "stories260K"), "smollm2": "smollm2"}


def peak_rss_mb(field: str = "VmHWM") -> float:
    """This process's own peak RSS (VmHWM: unlike ru_maxrss, it does not inherit the parent's peak at fork);
    field="VmPeak" gives the peak address-space size instead, what RLIMIT_AS limits."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one configuration, in a child process ---------------------------------------------------------------------
# Calibration text starts at these character offsets; evaluation reads from the start of each file and must end
# before them (checked), so the two never share text.
CALIB_OFFSET = {"wikitext2": 200_000, "tinystories": 300_000}
# Evaluation tokens per model (wikitext-2, TinyStories). stories260K evaluates fast, so it reads ~190k characters
# of each file: at 8k tokens its wikitext-2 perplexity moved by a few percent with the calibration seed alone,
# as much as the differences between methods.
EVAL_TOKENS = {"stories": (120_000, 65_536), "smollm2": (16_384, 8_192)}


def calibration_tokens(tokenizer, samples: int, seq_len: int, seed: int = 0):
    """Calibration windows from text the evaluation never sees, half from wikitext-2 and half from TinyStories
    (beyond CALIB_OFFSET): calibrating on one domain alone overfits GPTQ and AWQ to it."""
    import torch

    from lowbit.calibration.text import sample_windows, tokenize_for_calibration

    sources = [WIKI.read_text(encoding="utf-8")[CALIB_OFFSET["wikitext2"]:],
               TINY.read_text(encoding="utf-8")[CALIB_OFFSET["tinystories"]:]]
    counts = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    return torch.cat([sample_windows(tokenize_for_calibration(tokenizer, text[: n * seq_len * 8]), n, seq_len, seed)
                      for text, n in zip(sources, counts)])


def eval_tokens(tokenizer, path: Path, n_tokens: int, calib_offset: int):
    """The first `n_tokens` of a text; refuses counts that would reach into the calibration text."""
    from lowbit.eval.perplexity import read_text, tokenize_text

    text = read_text(path)
    if tokenize_text(tokenizer, text[:calib_offset]).numel() < n_tokens:
        raise SystemExit(f"{n_tokens} evaluation tokens of {path.name} reach past character {calib_offset}, where "
                         "the calibration text starts; evaluate fewer tokens")
    return tokenize_text(tokenizer, text, n_tokens)


def run_one(spec: dict) -> dict:
    """Load, quantize (timed), evaluate; returns the figures."""
    import torch

    from lowbit.eval.perplexity import evaluate_quality
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(MODELS[spec["model"]])
    result = dict(spec)
    if spec["method"] != "fp32":
        calib = calibration_tokens(tok, spec["calib_samples"], spec["calib_len"], spec.get("seed", 0))
        config = QuantizeConfig(method=spec["method"], bits=spec["bits"], group_size=spec["group"],
                                symmetric=False, skip=("lm_head",), options=dict(spec.get("options", {})))
        t0 = time.perf_counter()
        quantize_model(model, config, calibration=calib, progress=False)
        result["quantize_s"] = round(time.perf_counter() - t0, 1)
    result["quantize_peak_rss_mb"] = round(peak_rss_mb())
    for name, path, n in (("wikitext2", WIKI, spec["wiki_tokens"]), ("tinystories", TINY, spec["tiny_tokens"])):
        tokens = eval_tokens(tok, path, n, CALIB_OFFSET[name])
        result[f"ppl_{name}"] = round(evaluate_quality(model, tokens, ctx=spec["ctx"], progress=False).perplexity, 4)
    return result


def run_stream(spec: dict) -> dict:
    """Streaming quantization of an HF folder; peak RSS of this process."""
    import torch

    from lowbit.calibration.streaming import stream_quantize
    from lowbit.methods.base import QuantizeConfig

    calib = torch.randint(3, spec["vocab"], (spec["calib_samples"], spec["calib_len"]),
                          generator=torch.Generator().manual_seed(0))
    if spec.get("calib_model"):
        from lowbit.models.loading import load_tokenizer

        calib = calibration_tokens(load_tokenizer(Path(spec["source"])), spec["calib_samples"], spec["calib_len"])
    config = QuantizeConfig(method=spec["method"], bits=4, group_size=128, symmetric=False, skip=("lm_head",))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
        stream_quantize(spec["source"], Path(tmp) / "out", config, calibration=calib, progress=False)
        size = sum(p.stat().st_size for p in (Path(tmp) / "out").iterdir())
    return {**spec, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
            "peak_vm_mb": round(peak_rss_mb("VmPeak")), "output_mb": round(size / 2 ** 20)}


def run_whole(spec: dict) -> dict:
    """Control for the memory limit: load the checkpoint whole in fp32, as non-streaming quantization would."""
    from lowbit.models.loading import load_model

    t0 = time.perf_counter()
    try:
        load_model(spec["source"])
        outcome = "loaded"
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement: MemoryError from Python, torch's
        # "can't allocate memory" RuntimeError, or lowbit's loader wrapping the latter; record what happened
        outcome = f"{type(exc).__name__}: {exc}"[:300]
    return {**spec, "outcome": outcome, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb()), "peak_vm_mb": round(peak_rss_mb("VmPeak"))}


def in_child(kind: str, spec: dict, mem_limit_gb: float | None = None) -> dict:
    """Run one measurement in a fresh process (its own peak RSS), optionally under an address-space limit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    limit = None
    if mem_limit_gb:
        size = int(mem_limit_gb * 2 ** 30)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
    proc = subprocess.run([sys.executable, __file__, f"--child-{kind}", json.dumps(spec)], capture_output=True,
                          text=True, env=env, preexec_fn=limit)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "mem_limit_gb": mem_limit_gb} if mem_limit_gb else row


# -- synthetic checkpoint --------------------------------------------------------------------------------------
def make_synthetic_llama(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> float:
    """A random fp16 Llama checkpoint written one layer per shard (never whole in memory); returns fp32 GB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    heads = hidden // 128
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("layers") == layers:
        if not (folder / "model.safetensors.index.json").exists():
            write_shard_index(folder)
        return json.loads(done.read_text())["fp32_gb"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    params = 0

    def rand(*shape):
        nonlocal params
        params += torch.Size(shape).numel()
        return (torch.randn(*shape, generator=g) * 0.02).half()

    save_file({"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).half(),
               "lm_head.weight": rand(vocab, hidden)}, str(folder / "model-outer.safetensors"))
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {p + "input_layernorm.weight": torch.ones(hidden).half(),
                 p + "post_attention_layernorm.weight": torch.ones(hidden).half()}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
        shard[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        shard[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        shard[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        save_file(shard, str(folder / f"model-{i:05d}.safetensors"))
    write_shard_index(folder)
    done.write_text(json.dumps({"layers": layers, "fp32_gb": params * 4 / 2 ** 30}))
    return params * 4 / 2 ** 30


def write_shard_index(folder: Path) -> None:
    """model.safetensors.index.json, so transformers (the whole-model control) can load the shards."""
    from safetensors import safe_open

    weight_map = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def smollm2_folder(folder: Path) -> Path:
    from lowbit.models.loading import load_model

    if not (folder / "config.json").exists():
        model, tok = load_model("smollm2")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def mem_limits(spec: str | None, methods: list[str]) -> dict[str, float]:
    """--mem-limit-gb as {method: GiB}: "2" limits every method, "rtn=2,gptq=4" each its own."""
    if not spec:
        return {}
    if "=" not in spec:
        return dict.fromkeys(methods, float(spec))
    return {m: float(v) for m, v in (item.split("=") for item in spec.split(","))}


QUALITY_COLUMNS = [("model", "model", "s"), ("label", "method", "s"), ("bits", "bits", "d"), ("seed", "seed", "d"),
                   ("ppl_wikitext2", "wiki2 ppl", ".3f"), ("ppl_tinystories", "tinyst ppl", ".3f"),
                   ("quantize_s", "quant s", ".1f"), ("quantize_peak_rss_mb", "peak MB", "d")]
SUMMARY_COLUMNS = [("model", "model", "s"), ("label", "method", "s"), ("bits", "bits", "d"), ("seeds", "seeds", "d"),
                   ("wikitext2", "wiki2 ppl", "s"), ("tinystories", "tinyst ppl", "s"), ("beats_rtn", "beats rtn", "")]
STREAM_COLUMNS = [("model", "streamed model", "s"), ("method", "method", "s"), ("model_fp32_gb", "fp32 GB", ""),
                  ("mem_limit_gb", "limit GiB", ""), ("peak_rss_mb", "peak RSS MB", "d"), ("seconds", "seconds", ""),
                  ("outcome", "outcome", "s")]


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per (model, method, bits): perplexity mean/min/max over calibration seeds, and whether its worst seed
    still beats RTN on the same grid on both texts."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r.get("label", r["method"]), r["bits"]), []).append(r)
    out = []
    for (model, label, bits), runs in groups.items():
        if label in ("fp32", "rtn"):
            continue
        rtn = groups.get((model, "rtn", bits))
        entry = {"model": model, "label": label, "bits": bits, "seeds": len(runs)}
        for text in ("wikitext2", "tinystories"):
            values = [r[f"ppl_{text}"] for r in runs]
            entry[text] = {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)}
        entry["beats_rtn"] = None if not rtn else all(entry[t]["max"] < rtn[0][f"ppl_{t}"]
                                                      for t in ("wikitext2", "tinystories"))
        out.append(entry)
    return out


# -- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories,smollm2")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--methods", default="fp32,rtn,gptq,gptq-plain,awq",
                        help="gptq is lowbit's default (act-order + static groups); gptq-plain has neither")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--wiki-tokens", type=int, default=None, help="default per model: EVAL_TOKENS")
    parser.add_argument("--tiny-tokens", type=int, default=None, help="default per model: EVAL_TOKENS")
    parser.add_argument("--seeds", default="0", help="calibration sampling seeds (one run per seed and method)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="only the streaming memory figures")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    parser.add_argument("--synthetic-layers", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="where to put the synthetic checkpoint (default: a temp dir)")
    parser.add_argument("--stream-methods", default="rtn,gptq")
    parser.add_argument("--no-synthetic", action="store_true", help="stream only SmolLM2, not the synthetic model")
    parser.add_argument("--mem-limit-gb", default=None,
                        help="run the streaming children under this address-space limit in GiB (one number, or "
                             "per method: rtn=2,gptq=4), plus a control that loads the synthetic model whole under "
                             "each limit")
    args = parser.parse_args()

    rows = []
    for model in [] if args.no_quality else args.models.split(","):
        methods = args.methods.split(",")
        specs = [{"method": "fp32", "bits": 32}] if "fp32" in methods else []
        for bits in map(int, args.bits.split(",")):
            for m in ("rtn", "gptq", "gptq-plain", "awq"):
                # RTN uses no calibration: one run, whatever the seeds.
                for seed in [0] if m == "rtn" else map(int, args.seeds.split(",")):
                    if m == "gptq-plain" and m in methods:
                        specs.append({"method": "gptq", "bits": bits, "seed": seed, "label": m,
                                      "options": {"desc_act": False, "static_groups": False}})
                    elif m in methods:
                        specs.append({"method": m, "bits": bits, "seed": seed})
        wiki_tokens, tiny_tokens = EVAL_TOKENS[model]
        for spec in specs:
            spec.update(model=model, group=args.group, calib_samples=args.calib_samples, calib_len=args.calib_len,
                        wiki_tokens=args.wiki_tokens or wiki_tokens, tiny_tokens=args.tiny_tokens or tiny_tokens,
                        ctx=args.ctx)
            row = in_child("one", spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
    streaming = []
    limits = mem_limits(args.mem_limit_gb, args.stream_methods.split(","))
    if not args.no_streaming:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-bench-"))
        if "smollm2" in args.models:
            folder = smollm2_folder(work / "smollm2-hf")
            fp32_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2 ** 30
            for method in args.stream_methods.split(","):
                row = in_child("stream", {"source": str(folder), "method": method, "vocab": 49152,
                                          "calib_samples": args.calib_samples, "calib_len": args.calib_len,
                                          "calib_model": "smollm2", "model": "smollm2", "model_fp32_gb": round(fp32_gb, 2)},
                               limits.get(method))
                streaming.append(row)
                print(json.dumps(row), flush=True)
        synth = work / "synthetic-llama"
        if not args.no_synthetic:
            fp32_gb = make_synthetic_llama(synth, args.synthetic_layers, 2048, 5632, 32000)
            disk_gb = sum(p.stat().st_size for p in synth.glob("*.safetensors")) / 2 ** 30
            synth_spec = {"source": str(synth), "vocab": 32000,
                          "model": f"synthetic-llama-{args.synthetic_layers}L-2048",
                          "model_fp32_gb": round(fp32_gb, 2), "checkpoint_fp16_gb": round(disk_gb, 2)}
        for limit in [] if args.no_synthetic else sorted(set(limits.values())):
            row = in_child("whole", {**synth_spec, "method": "load whole"}, limit)
            streaming.append(row)
            print(json.dumps(row), flush=True)
        for method in [] if args.no_synthetic else args.stream_methods.split(","):
            row = in_child("stream", {**synth_spec, "method": method, "calib_samples": 4, "calib_len": 128,
                                      "tmp": str(work)}, limits.get(method))
            streaming.append(row)
            print(json.dumps(row), flush=True)

    sys.path.insert(0, str(ROOT))
    from lowbit.eval.report import format_table, write_json

    print()
    print(format_table([{**r, "label": r.get("label", r["method"])} for r in rows], QUALITY_COLUMNS))
    summary = seed_summary(rows)
    if summary:
        print("\nover calibration seeds: mean [worst, best]; 'beats rtn': the worst seed beats RTN on both texts")
        print(format_table([{**s, **{t: f"{s[t]['mean']:.3f} [{s[t]['max']:.3f}, {s[t]['min']:.3f}]"
                                     for t in ("wikitext2", "tinystories")}} for s in summary], SUMMARY_COLUMNS))
    if streaming:
        print()
        print(format_table(streaming, STREAM_COLUMNS))
    out = Path(args.out)
    write_json(out, {"command": " ".join(sys.argv), "quality": rows, "seed_summary": summary, "streaming": streaming,
                     "args": vars(args), "torch_threads": os.environ.get("OMP_NUM_THREADS")})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("--child-"):
        kind = sys.argv[1][len("--child-"):]
        print(json.dumps({"one": run_one, "stream": run_stream, "whole": run_whole}[kind](json.loads(sys.argv[2]))))
    else:
        main()
