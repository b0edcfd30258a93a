"""GPTQ and AWQ against RTN on the same grid, plus the memory of layer-wise streaming.

For stories260K and SmolLM2-135M (dequantized from its packaged Q4_1 GGUF): perplexity on wikitext-2 test and
TinyStories (first tokens, ctx 512, non-overlapping windows) for fp32, RTN, GPTQ and AWQ at 4-bit g128 and
3-bit g128 (asymmetric: AWQ's grid; RTN and GPTQ use the same), quantization wall time and peak RSS (each
configuration runs in its own process, so ru_maxrss is its own). Calibration windows come from text disjoint
from the evaluation tokens: wikitext-2 test beyond the first 200k characters for SmolLM2, TinyStories beyond
the first 300k characters for stories260K.

Streaming: peak RSS of `stream_quantize` (one block in memory at a time) on SmolLM2 saved as an HF folder and
on a generated random Llama checkpoint much larger than that peak, next to the model's fp32 size.

    python bench/bench_gptq_awq.py                 # everything (about an hour on 2 busy cores)
    python bench/bench_gptq_awq.py --models stories --no-streaming   # a minute
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


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: unlike ru_maxrss, it does not inherit the parent's peak at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one configuration, in a child process ---------------------------------------------------------------------
def calibration_tokens(model_key: str, tokenizer, samples: int, seq_len: int):
    """Calibration windows from text the evaluation never sees: TinyStories beyond its first 300k characters,
    and for SmolLM2 also wikitext-2 beyond its first 200k (half each: one domain alone overfits GPTQ to it)."""
    import torch

    from lowbit.calibration.text import sample_windows, tokenize_for_calibration

    sources = [TINY.read_text(encoding="utf-8")[300_000:]]
    if model_key != "stories":
        sources.insert(0, WIKI.read_text(encoding="utf-8")[200_000:])
    counts = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    return torch.cat([sample_windows(tokenize_for_calibration(tokenizer, text[: n * seq_len * 8]), n, seq_len, 0)
                      for text, n in zip(sources, counts)])


def eval_tokens(tokenizer, path: Path, n_tokens: int):
    from lowbit.eval.perplexity import read_text, tokenize_text

    return tokenize_text(tokenizer, read_text(path), n_tokens)


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
        calib = calibration_tokens(spec["model"], tok, spec["calib_samples"], spec["calib_len"])
        config = QuantizeConfig(method=spec["method"], bits=spec["bits"], group_size=spec["group"],
                                symmetric=False, skip=("lm_head",), options=dict(spec.get("options", {})))
        t0 = time.perf_counter()
        quantize_model(model, config, calibration=calib, progress=False)
        result["quantize_s"] = round(time.perf_counter() - t0, 1)
    result["quantize_peak_rss_mb"] = round(peak_rss_mb())
    for name, path, n in (("wikitext2", WIKI, spec["wiki_tokens"]), ("tinystories", TINY, spec["tiny_tokens"])):
        result[f"ppl_{name}"] = round(evaluate_quality(model, eval_tokens(tok, path, n), ctx=spec["ctx"],
                                                       progress=False).perplexity, 4)
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

        calib = calibration_tokens(spec["calib_model"], load_tokenizer(Path(spec["source"])), spec["calib_samples"],
                                   spec["calib_len"])
    config = QuantizeConfig(method=spec["method"], bits=4, group_size=128, symmetric=False, skip=("lm_head",))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
        stream_quantize(spec["source"], Path(tmp) / "out", config, calibration=calib, progress=False)
        size = sum(p.stat().st_size for p in (Path(tmp) / "out").iterdir())
    return {**spec, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
            "output_mb": round(size / 2 ** 20)}


def in_child(kind: str, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, f"--child-{kind}", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    done.write_text(json.dumps({"layers": layers, "fp32_gb": params * 4 / 2 ** 30}))
    return params * 4 / 2 ** 30


def smollm2_folder(folder: Path) -> Path:
    from lowbit.models.loading import load_model

    if not (folder / "config.json").exists():
        model, tok = load_model("smollm2")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


# -- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories,smollm2")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--methods", default="fp32,rtn,gptq,gptq-act,awq",
                        help="gptq-act is GPTQ with act-order (desc_act)")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--wiki-tokens", type=int, default=16384)
    parser.add_argument("--tiny-tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="only the streaming memory figures")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    parser.add_argument("--synthetic-layers", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="where to put the synthetic checkpoint (default: a temp dir)")
    args = parser.parse_args()

    rows = []
    for model in [] if args.no_quality else args.models.split(","):
        methods = args.methods.split(",")
        specs = [{"method": "fp32", "bits": 32}] if "fp32" in methods else []
        for bits in map(int, args.bits.split(",")):
            for m in ("rtn", "gptq", "gptq-act", "awq"):
                if m == "gptq-act" and m in methods:
                    specs.append({"method": "gptq", "bits": bits, "options": {"desc_act": True}, "label": m})
                elif m in methods:
                    specs.append({"method": m, "bits": bits})
        for spec in specs:
            spec.update(model=model, group=args.group, calib_samples=args.calib_samples, calib_len=args.calib_len,
                        wiki_tokens=args.wiki_tokens, tiny_tokens=args.tiny_tokens, ctx=args.ctx)
            row = in_child("one", spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
    streaming = []
    if not args.no_streaming:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-bench-"))
        if "smollm2" in args.models:
            folder = smollm2_folder(work / "smollm2-hf")
            fp32_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2 ** 30
            for method in ("rtn", "gptq"):
                row = in_child("stream", {"source": str(folder), "method": method, "vocab": 49152,
                                          "calib_samples": args.calib_samples, "calib_len": args.calib_len,
                                          "calib_model": "smollm2", "model": "smollm2", "model_fp32_gb": round(fp32_gb, 2)})
                streaming.append(row)
                print(json.dumps(row), flush=True)
        synth = work / "synthetic-llama"
        fp32_gb = make_synthetic_llama(synth, args.synthetic_layers, 2048, 5632, 32000)
        disk_gb = sum(p.stat().st_size for p in synth.glob("*.safetensors")) / 2 ** 30
        for method in ("rtn", "gptq"):
            row = in_child("stream", {"source": str(synth), "method": method, "vocab": 32000, "calib_samples": 4,
                                      "calib_len": 128, "model": f"synthetic-llama-{args.synthetic_layers}L-2048",
                                      "model_fp32_gb": round(fp32_gb, 2), "checkpoint_fp16_gb": round(disk_gb, 2),
                                      "tmp": str(work)})
            streaming.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{'model':9} {'method':8} {'bits':>4} {'wiki2 ppl':>10} {'tinyst ppl':>10} {'quant s':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['model']:9} {r.get('label', r['method']):8} {r['bits']:>4} {r['ppl_wikitext2']:>10.3f} {r['ppl_tinystories']:>10.3f} "
              f"{r.get('quantize_s', 0):>8} {r['quantize_peak_rss_mb']:>8}")
    if streaming:
        print()
        print(f"{'streamed model':28} {'method':6} {'fp32 GB':>8} {'peak RSS MB':>12} {'seconds':>8}")
        for r in streaming:
            print(f"{r['model']:28} {r['method']:6} {r['model_fp32_gb']:>8} {r['peak_rss_mb']:>12} {r['seconds']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quality": rows, "streaming": streaming, "args": vars(args),
                               "torch_threads": os.environ.get("OMP_NUM_THREADS")}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("--child-"):
        kind = sys.argv[1][len("--child-"):]
        print(json.dumps({"one": run_one, "stream": run_stream}[kind](json.loads(sys.argv[2]))))
    else:
        main()
