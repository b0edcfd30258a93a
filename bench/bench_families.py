"""Decode speed of the compiled step beyond Llama: one row per family, a random-weight model of a real model's
layer shape (fewer layers and a smaller vocabulary, so that all fit in memory and minutes; mixtures of experts
with fewer experts, each of the real shape, and the real top-k), RTN 4-bit g32 (or --layout gguf: llama.cpp's
Q4_K_M mix), and its tg tokens/s through each path lowbit can run it on, side by side in one run:

- compiled step: the engine's default (runtime/csrc/decode.c, one C call per token);
- torch decoder: lowbit's own decoder loop in torch ops over lowbit's quantized kernels (--no-native);
- transformers forward: transformers' model with lowbit's quantized Linears and its own cache (what every family
  outside Llama/Mistral/Qwen2/Qwen3 ran before, and the mixtures of experts until the step computed them).

Speed depends on shapes only, not on trained values, so random weights measure what a real model would.

    python bench/bench_families.py [--threads 2] [--tg 16] [--reps 5] [--layers 4] [--only gemma2,phi3]
                                   [--layout rtn|gguf] [--out families.json]

The paths run in rounds (one generation each per round, median over rounds), so that load from other processes
on a shared machine hits them alike.

Prints a table and writes bench/results/families.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.engine.generate import SamplingParams  # noqa: E402
from lowbit.engine.runner import Engine, HFDecoder, set_threads  # noqa: E402

# (transformers model_type, config of the real model's layer shape, the model it is shaped after)
FAMILIES = {
    "llama": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64), "Llama-3.2-1B"),
    "qwen2": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                            head_dim=64), "Qwen2.5-0.5B (q/k/v biases)"),
    "gemma": ("gemma", dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                            head_dim=256), "Gemma-2B"),
    "gemma2": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "Gemma-2-2B"),
    "gemma3": ("gemma3_text", dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512),
               "Gemma-3-1B"),
    "phi3": ("phi3", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32),
             "Phi-3-mini"),
    # Mixtures of experts: a token's cost is its top-k experts (and the router), not the number of experts, so
    # these keep each real model's expert shape and top-k with fewer experts (memory and build minutes).
    "mixtral": ("mixtral", dict(hidden_size=2048, intermediate_size=7168, num_attention_heads=16,
                                num_key_value_heads=4, head_dim=128, num_local_experts=4, num_experts_per_tok=2),
                "Mixtral-8x7B at half width, top-2 of 4 experts"),
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=2048, intermediate_size=1408, moe_intermediate_size=1408,
                                    shared_expert_intermediate_size=5632, num_attention_heads=16,
                                    num_key_value_heads=16, num_experts=8, num_experts_per_tok=4,
                                    norm_topk_prob=False),
                  "Qwen1.5-MoE-A2.7B, top-4 of 8 (of its 60) experts + shared"),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=768, moe_intermediate_size=768,
                                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=16,
                                    num_experts_per_tok=8, norm_topk_prob=True),
                  "Qwen3-30B-A3B, top-8 of 16 (of its 128) experts"),
    # LayerNorm families
    "gpt_neox": ("gpt_neox", dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16), "Pythia-410M"),
    "gpt2": ("gpt2", dict(n_embd=768, n_head=12), "GPT-2 (124M)"),
    "opt": ("opt", dict(hidden_size=768, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768), "OPT-125M"),
    "bloom": ("bloom", dict(hidden_size=1024, n_head=16), "BLOOM-560M"),
}


# Real GGUF files PyPI packages ship (bench/real_models.py), kept quantized: Gemma 3 next to a Llama-class model
REAL = {"gemma3": ("gemma3-270m-real", "Gemma-3-270M Q4_K_M (real file)"),
        "qwen2": ("qwen2.5-0.5b-real", "Qwen2.5-0.5B Q4_K_M (real file)")}


def real_model(name: str):
    from lowbit.models.loading import load_model

    try:
        from bench.real_models import real_model_path
    except ImportError:       # run as a script: bench/ is on the path
        from real_models import real_model_path
    return load_model(real_model_path(name), keep_quantized=True)[0]


# How the random models are quantized: RTN 4-bit g32 (the torch paths run torch's int4pack kernel on it), or
# llama.cpp's Q4_K_M mix (GGUF blocks: every path runs lowbit's block kernels)
LAYOUTS = {"rtn": dict(method="rtn", bits=4, group_size=32, skip=()),
           "gguf": dict(method="gguf", skip=(), options={"gguf_type": "Q4_K_M"})}


def family_model(model_type: str, shape: dict, layers: int, vocab: int, layout: str = "rtn"):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    config = AutoConfig.for_model(model_type, **shape, num_hidden_layers=layers, vocab_size=vocab,
                                  max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.zero_()
    quantize_model(model, QuantizeConfig(**LAYOUTS[layout]), progress=False)
    return model


PATHS = ("compiled step", "torch decoder", "transformers forward")


def generation_seconds(engine: Engine, tg: int) -> float:
    """Seconds to generate `tg` greedy tokens after a 1-token prompt (as bench_engine's tg)."""
    began = time.perf_counter()
    seq = engine.start([5], SamplingParams(max_new_tokens=tg, temperature=0.0), stop_on_eos=False)
    while not seq.finished:
        engine.step()
    engine.release(seq)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tg", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    parser.add_argument("--no-real", action="store_true", help="skip the real GGUF files (bench/real_models.py)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="rtn",
                        help="random models' weights: RTN 4-bit g32 or GGUF Q4_K_M blocks")
    parser.add_argument("--out", default="", help="results file name in bench/results (default families.json)")
    args = parser.parse_args()
    wanted = [f for f in args.only.split(",") if f] or list(FAMILIES)
    unknown = sorted(set(wanted) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    threads = set_threads(args.threads)
    context = args.tg + 8
    rows = []
    jobs = [(family, False) for family in wanted]
    if not args.no_real:
        jobs += [(family, True) for family in REAL if family in wanted]
    for family, is_real in jobs:
        model_type, shape, real = FAMILIES[family]
        began = time.perf_counter()
        if is_real:
            model = real_model(REAL[family][0])
            real = REAL[family][1]
            config = model.config
            shape = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_key_value_heads")}
        else:
            model = family_model(model_type, shape, args.layers, args.vocab, args.layout)
        built = time.perf_counter() - began
        engines = {}
        for path in PATHS:
            engines[path] = Engine(model, context=context, native=path == "compiled step")
            if path == "transformers forward":
                engines[path].decoder = HFDecoder(model, 1, context, "forced by the bench")
        paths = {path: engine.decode_path for path, engine in engines.items()}
        # Rounds of one run per path, so that a change in the machine's load hits every path alike.
        seconds: dict[str, list[float]] = {path: [] for path in PATHS}
        for round_ in range(args.reps + 1):       # round 0 warms up (kernels pack their weights)
            for path, engine in engines.items():
                took = generation_seconds(engine, args.tg)
                if round_:
                    seconds[path].append(took)
        rates = {path: args.tg / statistics.median(s) for path, s in seconds.items()}
        del engines
        assert paths["compiled step"] == "compiled step", paths
        layers, vocab = (model.config.num_hidden_layers, model.config.vocab_size) if is_real else (args.layers,
                                                                                                   args.vocab)
        rows.append({"family": family, "shape_of": real, "layers": layers, "vocab": vocab, "real_file": is_real,
                     "layout": "as the file" if is_real else args.layout,
                     **{k: getattr(model.config, k, None) for k in ("hidden_size", "intermediate_size",
                                                                    "num_attention_heads", "num_key_value_heads")},
                     **{k: shape[k] for k in ("num_local_experts", "num_experts", "num_experts_per_tok",
                                              "moe_intermediate_size", "shared_expert_intermediate_size")
                        if k in shape},
                     "tg_tok_s": rates, "paths": paths,
                     "compiled_vs_torch": rates["compiled step"] / rates["torch decoder"],
                     "compiled_vs_transformers": rates["compiled step"] / rates["transformers forward"],
                     "build_seconds": round(built, 1)})
        print(f"{family}: {rates}", flush=True)
        del model
    print(f"\ntg{args.tg} tokens/s, {threads} threads (median of {args.reps} rounds); random weights {args.layout} "
          f"with {args.layers} layers and vocab {args.vocab}, real files as they are\n")
    print("| family | shape of | layers | compiled step | torch decoder | transformers forward | compiled / torch | "
          "compiled / transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["tg_tok_s"]
        print(f"| {r['family']} | {r['shape_of']} | {r['layers']} | {t['compiled step']:.1f} | {t['torch decoder']:.1f} | "
              f"{t['transformers forward']:.1f} | {r['compiled_vs_torch']:.2f}x | "
              f"{r['compiled_vs_transformers']:.2f}x |")
    out = ROOT / "bench" / "results" / (args.out or "families.json")
    out.write_text(json.dumps({"threads": threads, "tg": args.tg, "reps": args.reps, "layers": args.layers,
                               "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
