"""Benchmark of the bitsandbytes-style methods on SmolLM2-135M (issue 5).

For fp32, RTN 4-bit g128, nf4, nf4 + double quant, fp4, LLM.int8 (threshold 6) and dynamic int8: perplexity on
the first tokens of wikitext-2 test, KL divergence and top-1 agreement against fp32, bits per weight over the
quantized layers, model memory, and batch-1 prompt / decode tokens/s with the ratio to fp32. NF4 decode is
also timed with each of its kernels. Prints a table and writes bench/results/bnb.json.

    python bench/bench_bnb.py [--model smollm2] [--max-tokens 20000] [--ctx 512] [--peer]
                              [--out bench/results/bnb.json]

--peer adds transformers' own generate at fp32 and with bitsandbytes nf4 / LLM.int8 on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from lowbit.eval.footprint import footprint
from lowbit.eval.perplexity import read_text, tokenize_text
from lowbit.eval.report import format_table, measure_speed, write_json
from lowbit.methods.base import QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.models.loading import load_model
from lowbit.runtime.surgery import set_kernel

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "corpora" / "wikitext2-raw-test.txt"

CONFIGS: list[tuple[str, QuantizeConfig]] = [
    ("rtn-4bit-g128", QuantizeConfig(method="rtn", bits=4, group_size=128)),
    ("nf4", QuantizeConfig(method="nf4")),
    ("nf4+dq", QuantizeConfig(method="nf4", options={"double_quant": True})),
    ("fp4", QuantizeConfig(method="fp4")),
    ("int8 t=6.0", QuantizeConfig(method="int8", options={"threshold": 6.0})),
    ("dynamic-int8", QuantizeConfig(method="dynamic-int8")),
]
NF4_KERNELS = ("bnb4-tiled", "bnb4-int8", "bnb4-cached")

COLUMNS = [("name", "model", "s"), ("kernel", "kernel", "s"), ("bits_per_weight", "bpw", ".3f"),
           ("memory_mb", "mem MB", ".1f"), ("perplexity", "ppl", ".3f"), ("kld", "KLD", ".5f"),
           ("top1_agreement", "top-1", ".3f"), ("prompt_tokens_per_s", "pp tok/s", ".1f"),
           ("decode_tokens_per_s", "tg tok/s", ".2f"), ("decode_vs_fp32", "tg/fp32", ".2f"),
           ("quantize_s", "quant s", ".1f")]


SPEED_REPEATS = 2


def best_speed(model, tokens: torch.Tensor, new_tokens: int):
    """Fastest of SPEED_REPEATS batch-1 runs (the machine is shared: the best run is the least disturbed)."""
    runs = [measure_speed(model, tokens, prompt_len=128, new_tokens=new_tokens) for _ in range(SPEED_REPEATS)]
    return max(runs, key=lambda s: s.decode_tokens_per_s)


def with_best_speed(row: dict, model, tokens: torch.Tensor, new_tokens: int) -> dict:
    stats = best_speed(model, tokens, new_tokens)
    row["prompt_tokens_per_s"] = max(row.get("prompt_tokens_per_s") or 0.0, stats.prompt_tokens_per_s)
    row["decode_tokens_per_s"] = max(row.get("decode_tokens_per_s") or 0.0, stats.decode_tokens_per_s)
    return row


@torch.no_grad()
def compare_on_windows(base, models: dict, tokens: torch.Tensor, ctx: int) -> dict[str, dict]:
    """Perplexity of each model, and mean KL(base || model) and top-1 agreement, over non-overlapping windows."""
    import math

    import torch.nn.functional as F

    from lowbit.eval.perplexity import window_logits, windows

    sums = {name: {"nll": 0.0, "kld": 0.0, "agree": 0} for name in ["fp32", *models]}
    count = 0
    for window in windows(tokens, ctx):
        target = window[1:]
        base_logp = F.log_softmax(window_logits(base, window)[:-1], dim=-1)
        base_top = base_logp.argmax(-1)
        sums["fp32"]["nll"] += F.nll_loss(base_logp, target, reduction="sum").item()
        for name, model in models.items():
            logp = F.log_softmax(window_logits(model, window)[:-1], dim=-1)
            sums[name]["nll"] += F.nll_loss(logp, target, reduction="sum").item()
            sums[name]["kld"] += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            sums[name]["agree"] += int((logp.argmax(-1) == base_top).sum())
        count += target.numel()
    out = {name: {"perplexity": math.exp(s["nll"] / count), "tokens": count} for name, s in sums.items()}
    for name in models:
        out[name].update({"kld": sums[name]["kld"] / count, "top1_agreement": sums[name]["agree"] / count})
    return out


def transformers_peer_speeds(base, tokens: torch.Tensor, new_tokens: int) -> list[dict]:
    """transformers generate at batch 1: fp32, and bitsandbytes nf4 / LLM.int8 on CPU (the seeds' setup)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    prompt = tokens[:128].unsqueeze(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        for name, qconfig in [("transformers fp32", None),
                              ("transformers+bnb nf4", BitsAndBytesConfig(load_in_4bit=True,
                                                                          bnb_4bit_quant_type="nf4",
                                                                          bnb_4bit_compute_dtype=torch.bfloat16)),
                              ("transformers+bnb int8", BitsAndBytesConfig(load_in_8bit=True))]:
            try:
                model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qconfig, device_map="cpu",
                                                             dtype=torch.float32)
                best = 0.0
                with torch.no_grad():
                    for _ in range(2):  # greedy decode with transformers' own KV cache; the prompt is not timed
                        out = model(prompt, use_cache=True)
                        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                        t0 = time.perf_counter()
                        for _ in range(new_tokens):
                            out = model(token, past_key_values=past, use_cache=True)
                            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                        best = max(best, new_tokens / (time.perf_counter() - t0))
            except Exception as exc:  # the peer is optional: report why it did not run
                rows.append({"name": name, "kernel": f"failed: {type(exc).__name__} {str(exc)[:50]}"})
                continue
            rows.append({"name": name, "kernel": "transformers", "decode_tokens_per_s": best})
    return rows


def kernels_in_use(model) -> str:
    from lowbit.runtime.surgery import quantized_modules

    names = sorted({m.kernel_name for _, m in quantized_modules(model)})
    return ",".join(names) or "dense"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(WIKITEXT))
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated subset of config names")
    ap.add_argument("--speed-repeats", type=int, default=2, help="timed generation runs per model (best kept)")
    ap.add_argument("--peer", action="store_true", help="also time transformers (+bitsandbytes) generate")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bnb.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    global SPEED_REPEATS
    SPEED_REPEATS = args.speed_repeats

    base, tok = load_model(args.model)
    tokens = tokenize_text(tok, read_text(args.data), args.max_tokens)
    print(f"{args.model}: {tokens.numel()} tokens of {Path(args.data).name}, ctx {args.ctx}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    wanted = set(args.only.split(",")) if args.only else None
    models: dict[str, torch.nn.Module] = {}
    quantize_s: dict[str, float] = {}
    for name, config in CONFIGS:
        if wanted and name not in wanted:
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_model(model, config, progress=False)
        quantize_s[name] = time.perf_counter() - t0
        models[name] = model
    # One pass over the text: the base model's log-probabilities are computed once per window and compared
    # with every quantized model (instead of re-running the base once per configuration).
    quality = compare_on_windows(base, models, tokens, args.ctx)
    print(format_table([{"name": name, **q} for name, q in quality.items()],
                       [("name", "model", "s"), ("perplexity", "ppl", ".3f"), ("kld", "KLD", ".5f"),
                        ("top1_agreement", "top-1", ".3f"), ("tokens", "tokens", "d")]), flush=True)
    meta = {"model": args.model, "data": Path(args.data).name, "tokens": int(tokens.numel()), "ctx": args.ctx,
            "threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens,
            "load_average_at_start": os.getloadavg()[0]}
    write_json(args.out, {**meta, "quality": quality, "rows": []})
    rows = [with_best_speed({"name": "fp32", "kernel": "dense", "perplexity": quality["fp32"]["perplexity"],
                             "memory_mb": footprint(base).total_bytes / 1e6, "quantize_s": 0.0,
                             "decode_vs_fp32": 1.0}, base, tokens, args.decode_tokens)]
    fp32_decode = rows[0]["decode_tokens_per_s"]
    print(format_table(rows, COLUMNS), flush=True)
    for name, model in models.items():
        fp = footprint(model)
        row = with_best_speed({"name": name, "kernel": kernels_in_use(model), **quality[name],
                               "bits_per_weight": fp.quantized_bits_per_weight,
                               "model_bits_per_weight": fp.model_bits_per_weight,
                               "memory_mb": fp.total_bytes / 1e6, "quantize_s": quantize_s[name]},
                              model, tokens, args.decode_tokens)
        row["decode_vs_fp32"] = row["decode_tokens_per_s"] / fp32_decode
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
        write_json(args.out, {**meta, "quality": quality, "rows": rows, "complete": False})
        if name == "nf4":
            for kernel in NF4_KERNELS[1:]:  # the same codes with the other kernels: speed (and bnb4-int8 quality)
                set_kernel(model, kernel)
                stats = best_speed(model, tokens, args.decode_tokens)
                krow = {"name": name, "kernel": kernel, "bits_per_weight": row["bits_per_weight"],
                        "prompt_tokens_per_s": stats.prompt_tokens_per_s,
                        "decode_tokens_per_s": stats.decode_tokens_per_s,
                        "decode_vs_fp32": stats.decode_tokens_per_s / fp32_decode}
                if kernel == "bnb4-int8":
                    krow.update(compare_on_windows(base, {"k": model}, tokens, args.ctx)["k"])
                rows.append(krow)
                print(format_table([krow], COLUMNS).splitlines()[-1], flush=True)
            set_kernel(model, "auto")
    # fp32 once more at the end, so a busy moment at the start does not flatter the ratios
    again = best_speed(base, tokens, args.decode_tokens)
    if again.decode_tokens_per_s > fp32_decode:
        rows[0]["decode_tokens_per_s"] = again.decode_tokens_per_s
        rows[0]["prompt_tokens_per_s"] = max(rows[0]["prompt_tokens_per_s"], again.prompt_tokens_per_s)
        for row in rows[1:]:
            row["decode_vs_fp32"] = row["decode_tokens_per_s"] / again.decode_tokens_per_s
    if args.peer:
        for row in transformers_peer_speeds(base, tokens, args.decode_tokens):
            if row.get("decode_tokens_per_s"):
                row["decode_vs_fp32"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
            rows.append(row)
    print()
    print(format_table(rows, COLUMNS))
    write_json(args.out, {**meta, "quality": quality, "rows": rows, "complete": True})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
