"""The `lowbit` command line: quantize, inspect, generate, chat, eval, import (and commands added by plugins)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("lowbit")

# Modules that add subcommands: each defines add_commands(subparsers). Optional features register here.
COMMAND_MODULES: list[str] = ["lowbit.engine.commands",   # serve, bench (issue 6)
                               "lowbit.training.commands",  # finetune, merge (issue 14)
                               "lowbit.eval.compare"]       # compare (issue 15)


def _load_model(spec: str, args: argparse.Namespace, **kw: Any):
    from lowbit.models.loading import load_model

    log.info("loading %s", spec)
    return load_model(spec, kernel=getattr(args, "kernel", "auto"), **kw)


# ---------------------------------------------------------------------------------------------- quantize
# CLI flags that become method options (only when given, so each method rejects what it does not take).
METHOD_OPTION_FLAGS: dict[str, str] = {
    "damp": "damp", "desc_act": "desc_act", "static_groups": "static_groups",
    "true_sequential": "true_sequential", "zero_point": "zero_point", "blocksize": "blocksize",
    "double_quant": "double_quant", "compute_dtype": "compute_dtype", "threshold": "threshold",
}


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write it")
    p.add_argument("model", help="HF folder, .gguf file, or a packaged model name (smollm2)")
    p.add_argument("-o", "--output", required=True, help="output folder (or .gguf file for --format gguf)")
    p.add_argument("--method", default=None, help="rtn (default), gptq, awq, nf4, fp4, int8, dynamic-int8, ...")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="columns per group; -1 per channel, 0 per tensor")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (zero point per group)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (the default)")
    p.add_argument("--clip-search", action="store_true", help="MSE-optimal clipping instead of absmax")
    p.add_argument("--skip", default=None, help="comma-separated module patterns to keep unquantized "
                   "(default lm_head; with --format gguf the mix decides)")
    p.add_argument("--format", default="lowbit", help="lowbit (default), gptq, awq, bnb, gguf")
    p.add_argument("--float-dtype", default=None, choices=("source", "float32", "float16", "bfloat16"),
                   help="lowbit format: dtype of the embedding and head kept unquantized (default source: the "
                        "checkpoint's own where exact)")
    p.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    cal = p.add_argument_group("calibration (gptq, awq, imatrix)")
    cal.add_argument("--calib", default=None, help="calibration text file (default: self-generated text)")
    cal.add_argument("--calib-samples", type=int, default=128)
    cal.add_argument("--calib-len", type=int, default=512)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--stream", action="store_true", help="load, quantize and write one layer at a time "
                     "from the safetensors shards (low memory; lowbit format)")
    opt = p.add_argument_group("method options")
    opt.add_argument("--damp", type=float, default=None, help="GPTQ Hessian dampening (fraction of mean diag)")
    opt.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                     help="GPTQ act-order (default on)")
    opt.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                     help="GPTQ groups fixed before act-order, keeping g_idx contiguous (default on)")
    opt.add_argument("--true-sequential", action="store_true", default=None)
    opt.add_argument("--no-zero-point", dest="zero_point", action="store_false", default=None, help="AWQ")
    opt.add_argument("--blocksize", type=int, default=None, help="NF4/FP4 block size")
    opt.add_argument("--double-quant", action="store_true", default=None, help="NF4/FP4 double quantization")
    opt.add_argument("--compute-dtype", default=None, help="NF4/FP4 compute dtype (bf16, fp32)")
    opt.add_argument("--threshold", type=float, default=None, help="LLM.int8 outlier threshold")
    gg = p.add_argument_group("GGUF output")
    gg.add_argument("--type", default=None, help="GGUF type or mix: Q4_K_M, Q8_0, Q4_0, F16, ...")
    gg.add_argument("--tensor-type", action="append", default=[], help="REGEX=TYPE per-tensor override")
    gg.add_argument("--pure", action="store_true", help="GGUF: same type for every tensor")
    gg.add_argument("--imatrix-data", default=None, help="GGUF: text for importance-weighted quantization")
    p.set_defaults(func=cmd_quantize)


def build_quantize_config(args: argparse.Namespace):
    from lowbit.methods.base import QuantizeConfig

    options = {name: getattr(args, flag) for flag, name in METHOD_OPTION_FLAGS.items()
               if getattr(args, flag, None) is not None}
    if args.asym and args.sym:
        from lowbit.errors import LowbitError

        raise LowbitError("--asym and --sym contradict each other; give one")
    method = args.method or "rtn"
    skip = "lm_head" if args.skip is None else args.skip
    if args.format == "gguf" and args.method in (None, "gptq"):
        # The llama.cpp mix becomes a per-layer plan of GGUF schemes chosen before quantization, and the walk
        # quantizes every Linear on its planned grid (GPTQ's error compensation on it with --method gptq), so
        # the GGUF writer only serialises the blocks; the mix decides the head's type too.
        from lowbit.methods.gguf_gptq import mix_options

        method = "gguf" if args.method is None else "gptq-gguf"
        options.update(mix_options(args.type, args.tensor_type, args.pure))
        skip = args.skip or ""
    return QuantizeConfig(method=method, bits=args.bits, group_size=args.group_size,
                          symmetric=not args.asym, clip_search=args.clip_search,
                          skip=tuple(s for s in skip.split(",") if s), options=options)


def cmd_quantize(args: argparse.Namespace) -> None:
    import time

    from lowbit.api import save
    from lowbit.formats.registry import get_writer
    from lowbit.methods.base import CalibrationRequest, get_method
    from lowbit.methods.pipeline import quantize_model

    writer = get_writer(args.format)          # fail on a bad format before any work
    config = build_quantize_config(args)
    get_method(config)                        # fail on an unknown method or option before loading
    from lowbit.formats.hf_quantized import check_format_config
    check_format_config(writer.name, config)
    if getattr(args, "stream", False):
        from lowbit.calibration.streaming import stream_from_cli
        return print(stream_from_cli(args, config))
    model, tokenizer = _load_model(args.model, args)
    t0 = time.perf_counter()
    writer_options = {} if args.float_dtype is None else {"float_dtype": args.float_dtype}
    if args.format == "gguf":
        writer_options.update({"type": args.type or "Q4_K_M", "tensor_types": args.tensor_type or None,
                               "pure": args.pure})
        if args.imatrix_data is not None:
            from lowbit.calibration.imatrix import imatrix_from_file

            writer_options["importance"] = imatrix_from_file(model, tokenizer, args.imatrix_data)
            if config.method == "gguf":
                config.options["importance"] = writer_options["importance"]
    calibration = CalibrationRequest(tokenizer, args.calib, args.calib_samples, args.calib_len, args.seed)
    if writer.name == "gptq":
        from lowbit.formats.gptq import vllm_gptq_problems

        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        for problem in vllm_gptq_problems(config.symmetric, dtype):
            log.warning("this GPTQ file will not load in vLLM as written: %s", problem)
    quantize_model(model, config, calibration=calibration, kernel=args.kernel)
    out = save(model, args.output, format=writer.name, tokenizer=tokenizer, **writer_options)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - t0)
    print(out)


# ---------------------------------------------------------------------------------------------- inspect
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="architecture, size and quantization of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--load", action="store_true",
                   help="load the model (slow: reads every weight) to also report memory and the kernels chosen; "
                        "by default only headers are read")
    p.set_defaults(func=cmd_inspect)


def inspect_model(model, path: Path | None) -> dict[str, Any]:
    from collections import Counter

    from lowbit.eval.footprint import footprint, path_size
    from lowbit.runtime.surgery import quantized_modules

    fp = footprint(model)
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
    quantized = dict(quantized_modules(model))
    info: dict[str, Any] = {
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "parameters": fp.total_weights,
        "dtype": ", ".join(d for d, _ in dtypes.most_common()),
        "memory_mb": round(fp.total_bytes / 1e6, 3),
        "bits_per_weight_model": round(fp.model_bits_per_weight, 4),
    }
    if path is not None:
        info["file_size_mb"] = round(path_size(path) / 1e6, 3)
    if quantized:
        schemes = Counter(m.qweight.scheme.name for m in quantized.values())
        config = getattr(model, "lowbit_config", None)
        first = next(iter(quantized.values())).qweight
        info["quantization"] = {
            "method": config.method if config else "unknown",
            "schemes": dict(schemes),
            "bits": getattr(first.scheme, "bits", None),
            "group_size": first.group_size,
            "quantized_layers": len(quantized),
            "bits_per_weight": round(fp.quantized_bits_per_weight, 4),
            "kernels": dict(Counter(m.kernel_name for m in quantized.values())),
        }
    return info


def cmd_inspect(args: argparse.Namespace) -> None:
    from lowbit.models.paths import resolve_model_path

    path = resolve_model_path(args.model)
    if args.load:
        model, _ = _load_model(args.model, args, keep_quantized=True)
        info = inspect_model(model, path)
    else:
        from lowbit.models.headers import describe, runtimes_for

        info = describe(path)
        info["runtimes"] = runtimes_for(path, info)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


# ---------------------------------------------------------------------------------------------- generate / chat
def add_sampling_args(p) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--load-in-4bit", action="store_true", help="quantize to NF4 while loading")
    p.add_argument("--load-in-8bit", action="store_true", help="quantize to LLM.int8 while loading")
    from lowbit.engine.commands import add_runtime_args

    add_runtime_args(p)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text, streaming tokens as they come")
    p.add_argument("model")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat using the tokenizer's chat template")
    c.add_argument("model")
    c.add_argument("--system", default=None, help="system message")
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)


def _runtime_model(args: argparse.Namespace):
    from lowbit.engine.runner import set_threads
    from lowbit.methods.base import CalibrationRequest, QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    set_threads(args.threads)
    load_time_method = "nf4" if args.load_in_4bit else "int8" if args.load_in_8bit else None
    # only the engine runs it (no quantization at load, no adapter): a .gguf need not import transformers' models
    engine_only = load_time_method is None and not getattr(args, "adapter", None)
    model, tokenizer = _load_model(args.model, args, keep_quantized=True, engine_only=engine_only)
    if load_time_method:
        quantize_model(model, QuantizeConfig(method=load_time_method), CalibrationRequest(tokenizer),
                       kernel=args.kernel)
    from lowbit.engine.commands import with_adapter

    with_adapter(model, args)
    model.lowbit_engine_options = {"activations": args.activations}
    return model, tokenizer


def _sampling(args: argparse.Namespace):
    from lowbit.engine.generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed).validate()


def cmd_generate(args: argparse.Namespace) -> None:
    from lowbit.engine.generate import generate_text

    params = _sampling(args)
    model, tokenizer = _runtime_model(args)
    if not args.chat:
        sys.stdout.write(args.prompt)
    _, stats = generate_text(model, tokenizer, args.prompt, params, chat=args.chat,
                             on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    log.info("prompt %d tokens at %.1f tok/s, generated %d tokens at %.1f tok/s", stats.prompt_tokens,
             stats.prompt_tokens_per_s, stats.new_tokens, stats.decode_tokens_per_s)


def cmd_chat(args: argparse.Namespace) -> None:
    from lowbit.engine.generate import generate_text

    params = _sampling(args)
    model, tokenizer = _runtime_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply, _ = generate_text(model, tokenizer, "", params, messages=messages,
                                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


# ---------------------------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KLD/top-1 vs a base model, size, memory, speed")
    p.add_argument("model")
    p.add_argument("--data", default=None, help="text file (default: text generated by the base model)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--base", default=None, help="unquantized model for KL-divergence and top-1 agreement")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--compute", default="float32", choices=("float32", "runtime"),
                   help="arithmetic for the quality figures: float32 (default: what quantization lost) or the "
                        "runtime's fast kernels (bf16 activations where they use them)")
    p.add_argument("--no-speed", action="store_true", help="skip the prompt/decode speed measurement")
    p.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from lowbit.eval.perplexity import evaluation_tokens
    from lowbit.eval.report import EVAL_COLUMNS, evaluate, format_table, write_json
    from lowbit.models.loading import resolve_model_path

    model, tokenizer = _load_model(args.model, args, keep_quantized=True)
    base = None
    if args.base:
        base, _ = _load_model(args.base, args)
    tokens = evaluation_tokens(base or model, tokenizer, args.data, args.max_tokens, args.ctx)
    measure = {"speed": not args.no_speed, "compute": args.compute}
    rows = [evaluate(model, tokens, Path(args.model).name, ctx=args.ctx, base=base,
                     path=resolve_model_path(args.model), **measure).to_dict()]
    if base is not None:
        rows.append(evaluate(base, tokens, Path(args.base).name + " (base)", ctx=args.ctx,
                             path=resolve_model_path(args.base), **measure).to_dict())
    print(format_table(rows, EVAL_COLUMNS))
    if args.json:
        write_json(args.json, {"data": args.data or "self-generated", "ctx": args.ctx, "results": rows})


# ---------------------------------------------------------------------------------------------- import
def add_import(sub) -> None:
    p = sub.add_parser("import", help="convert a .gguf into a Hugging Face folder (float32)")
    p.add_argument("model", help=".gguf file or packaged model name")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> None:
    from lowbit.formats.atomic import atomic_dir
    from lowbit.models.gguf_import import load_gguf_as_hf
    from lowbit.models.loading import resolve_model_path

    model, tokenizer = load_gguf_as_hf(resolve_model_path(args.model))
    with atomic_dir(args.output) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(args.output)


# ---------------------------------------------------------------------------------------------- main
BUILTIN_COMMANDS: list[Callable] = [add_quantize, add_inspect, add_generate, add_eval, add_import]


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize, export, run and evaluate LLMs on CPU.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in BUILTIN_COMMANDS:
        add(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="lowbit: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from lowbit.errors import LowbitError

    try:
        args.func(args)
    except LowbitError as exc:
        if args.debug:
            raise
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
