"""Issue 2 benchmark: SmolLM2-135M fp32 vs RTN 8-bit and 4-bit g128.

Perplexity on wikitext-2 test (first 50k tokens, ctx 512), KL-divergence and top-1 agreement vs the fp32
base (all models evaluated window by window in one pass, so the base runs once), bits per weight, file size,
quantization seconds, and decode tokens/s at batch 1 next to transformers' fp32 generate on the same prompt.

    .venv/bin/python bench/bench_core.py [--max-tokens 50000] [--data PATH]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.api import save  # noqa: E402
from lowbit.engine.generate import GenerationStats, SamplingParams, generate_ids  # noqa: E402
from lowbit.eval.footprint import footprint, path_size  # noqa: E402
from lowbit.eval.perplexity import read_text, tokenize_text, window_logits, windows  # noqa: E402
from lowbit.eval.report import format_table, write_json  # noqa: E402
from lowbit.methods.base import QuantizeConfig  # noqa: E402
from lowbit.methods.pipeline import quantize_model  # noqa: E402
from lowbit.models.loading import load_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "corpora" / "wikitext2-raw-test.txt"
PROMPT = "The history of the city begins in the early"


def decode_speed_lowbit(model, ids, n):
    stats = GenerationStats()
    for _ in generate_ids(model, ids, SamplingParams(max_new_tokens=n), stats):
        pass
    return stats.decode_tokens_per_s, stats.prompt_tokens_per_s


def decode_speed_transformers(model, ids, n):
    model.generate(ids.unsqueeze(0), max_new_tokens=4, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids.unsqueeze(0), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--max-tokens", type=int, default=50000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "core.json"))
    args = ap.parse_args()

    base, tok = load_model("smollm2")
    tokens = tokenize_text(tok, read_text(args.data), args.max_tokens)
    models = {"fp32": base}
    rows = {"fp32": {"name": "fp32", "quantize_s": 0.0, "bits_per_weight": 32.0,
                     "size_mb": footprint(base).total_bytes / 1e6}}
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    for name, cfg in {"rtn8-g128": QuantizeConfig(bits=8, group_size=128),
                      "rtn4-g128": QuantizeConfig(bits=4, group_size=128),
                      "rtn4-g128-asym": QuantizeConfig(bits=4, group_size=128, symmetric=False)}.items():
        t0 = time.perf_counter()
        q = quantize_model(copy.deepcopy(base), cfg, progress=False)
        seconds = time.perf_counter() - t0
        path = save(q, tmp / name, tokenizer=tok)
        models[name] = q
        rows[name] = {"name": name, "quantize_s": seconds, "size_mb": path_size(path / "model.safetensors") / 1e6,
                      "bits_per_weight": footprint(q).quantized_bits_per_weight}

    sums = {n: {"nll": 0.0, "kld": 0.0, "agree": 0} for n in models}
    count = 0
    wins = windows(tokens, args.ctx)
    t0 = time.perf_counter()
    for i, window in enumerate(wins):
        target = window[1:]
        base_logp = F.log_softmax(window_logits(base, window)[:-1], -1)
        count += target.numel()
        for name, model in models.items():
            logp = base_logp if model is base else F.log_softmax(window_logits(model, window)[:-1], -1)
            sums[name]["nll"] += F.nll_loss(logp, target, reduction="sum").item()
            sums[name]["kld"] += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            sums[name]["agree"] += (logp.argmax(-1) == base_logp.argmax(-1)).sum().item()
        print(f"\rwindow {i + 1}/{len(wins)} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr)
    print(file=sys.stderr)

    ids = tok(PROMPT, return_tensors="pt").input_ids[0]
    hf_tps = decode_speed_transformers(base, ids, args.decode_tokens)
    for name, model in models.items():
        r = rows[name]
        r["perplexity"] = math.exp(sums[name]["nll"] / count)
        r["kld"] = sums[name]["kld"] / count
        r["top1"] = sums[name]["agree"] / count
        r["decode_tok_s"], r["prompt_tok_s"] = decode_speed_lowbit(model, ids, args.decode_tokens)
        r["decode_vs_hf_fp32"] = r["decode_tok_s"] / hf_tps
    table = list(rows.values())
    print(f"SmolLM2-135M-Instruct, {Path(args.data).name}: {count} tokens, ctx {args.ctx}; "
          f"transformers fp32 generate: {hf_tps:.1f} tok/s; threads {torch.get_num_threads()}")
    print(format_table(table, [("name", "model", "s"), ("bits_per_weight", "bpw", ".3f"),
                               ("size_mb", "size MB", ".1f"), ("quantize_s", "quant s", ".1f"),
                               ("perplexity", "ppl", ".3f"), ("kld", "KLD", ".4f"), ("top1", "top-1", ".3f"),
                               ("decode_tok_s", "tg tok/s", ".1f"), ("decode_vs_hf_fp32", "vs HF fp32", ".2f")]))
    write_json(args.out, {"model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)", "data": args.data,
                          "tokens": count, "ctx": args.ctx, "transformers_fp32_decode_tok_s": hf_tps,
                          "threads": torch.get_num_threads(), "results": table})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
