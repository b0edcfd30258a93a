"""`lowbit serve` and `lowbit bench`: subcommands registered through cli.COMMAND_MODULES."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("lowbit")

API_KEY_ENV = "LOWBIT_API_KEY"


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The options every command that runs a model takes: threads, kernel, activations' arithmetic, adapter."""
    from lowbit.runtime.activations import ACTIVATION_CHOICES

    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kernel", default="auto", help="matmul kernel for quantized layers (auto, reference, ...)")
    p.add_argument("--activations", choices=ACTIVATION_CHOICES, default="auto",
                   help="decode matmuls' activations: int8 (llama.cpp's arithmetic: it rounds them to int8 blocks "
                        "for GGUF weights), float32 (float32-exact, as transformers), or auto (default: int8 for "
                        "GGUF block weights, float32 for lowbit's own layouts)")
    p.add_argument("--int8-activations", dest="activations", action="store_const", const="int8",
                   help="same as --activations int8")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter folder (peft format) to run with the model: merged on the fly into float "
                        "copies of the adapted layers (W + scaling B A), so the compiled step still applies")


def with_adapter(model, args: argparse.Namespace):
    """Apply `--adapter` to a loaded model (see lowbit.training.lora.apply_adapter)."""
    if getattr(args, "adapter", None):
        from lowbit.training.api import prepare_adapter_base
        from lowbit.training.lora import apply_adapter

        prepare_adapter_base(model, args.adapter)
        apply_adapter(model, args.adapter)
    return model


def add_commands(sub) -> None:
    """Add the serve and bench subcommands to the lowbit CLI."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)")
    s.add_argument("model", help="HF folder, .gguf file, lowbit/GPTQ/AWQ/bnb folder, or smollm2")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default=None, help="name clients pass as 'model' (default: the folder name)")
    add_runtime_args(s)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    s.add_argument("--ctx", type=int, default=2048, help="context per sequence (prompt + generated tokens)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: the {API_KEY_ENV} environment variable; "
                        "unset: no key)")
    s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body; larger ones get 413")
    s.add_argument("--http-workers", type=int, default=128,
                   help="connections served at once (a streaming client holds one); 512 more may wait, then 503")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request (headers and body)")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="prompt processing and generation tokens/s (like llama-bench)")
    b.add_argument("model")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for the pp test")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for the tg test")
    b.add_argument("-r", "--reps", type=int, default=3)
    add_runtime_args(b)
    b.add_argument("--vs-transformers", action="store_true", help="also time transformers on the same model")
    b.add_argument("--vs-llama-cpp", action="store_true",
                   help="also time llama.cpp (llama-cpp-python) on the same .gguf (MODEL or --gguf)")
    b.add_argument("--gguf", default=None, help="the .gguf llama.cpp runs (default: MODEL when it is a .gguf)")
    b.add_argument("--json", default=None, help="write the results to this JSON file")
    b.set_defaults(func=cmd_bench)


def _load(args: argparse.Namespace):
    """(model, tokenizer) kept quantized (a .gguf's output projection runs on its quantized blocks)."""
    from lowbit.engine.runner import set_threads
    from lowbit.models.loading import load_model

    set_threads(args.threads)
    # only the engine runs it (no adapter, no transformers timing): a .gguf need not import transformers' models
    engine_only = not getattr(args, "adapter", None) and not getattr(args, "vs_transformers", False)
    model, tokenizer = load_model(args.model, kernel=args.kernel, keep_quantized=True, engine_only=engine_only)
    return with_adapter(model, args), tokenizer


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from lowbit.engine.http_transport import ServerLimits
    from lowbit.engine.runner import Engine
    from lowbit.engine.server import Server
    from lowbit.errors import LowbitError
    from lowbit.models.loading import resolve_model_path

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--ctx", args.ctx, 2), ("--port", args.port, 0),
                             ("--http-workers", args.http_workers, 1)):
        if value < low:
            raise LowbitError(f"{flag} must be >= {low} (got {value})")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--read-timeout", args.read_timeout)):
        if not value > 0:
            raise LowbitError(f"{flag} must be > 0 (got {value})")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * (1 << 20)), http_workers=args.http_workers,
                          read_timeout=args.read_timeout, idle_timeout=min(10.0, args.read_timeout))
    model, tokenizer = _load(args)
    from lowbit.models.loading import PACKAGED_MODELS

    name = args.model_name or (args.model if args.model in PACKAGED_MODELS else resolve_model_path(args.model).name)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, context=args.ctx, threads=args.threads,
                    activations=args.activations)
    server = Server(engine, tokenizer, name, args.host, args.port, args.max_queue, limits, api_key)
    print(f"lowbit: serving {name!r} at {server.url}/v1 ({engine.threads} threads, batch {args.max_batch}, "
          f"context {engine.context}{', API key required' if api_key else ''}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def cmd_bench(args: argparse.Namespace) -> None:
    from lowbit.engine.bench import (
        bench_engine,
        bench_llama_cpp,
        bench_transformers,
        format_speed_table,
    )
    from lowbit.engine.runner import Engine
    from lowbit.errors import LowbitError
    from lowbit.models.loading import resolve_model_path

    if args.n_prompt < 0 or args.n_gen < 0 or args.reps < 1 or (args.n_prompt == 0 and args.n_gen == 0):
        raise LowbitError("bench needs -p >= 0, -n >= 0 (not both 0) and -r >= 1")
    gguf = args.gguf
    if args.vs_llama_cpp and gguf is None:
        path = resolve_model_path(args.model)
        if path.suffix.lower() != ".gguf":
            raise LowbitError("--vs-llama-cpp needs a .gguf: pass one as MODEL or with --gguf FILE")
        gguf = str(path)
    model, _ = _load(args)
    engine = Engine(model, max_batch=1, context=max(args.n_prompt, args.n_gen) + 8, threads=args.threads,
                    activations=args.activations)
    decode_path, arithmetic = engine.decode_path, engine.arithmetic
    print(f"decode: {decode_path}")
    print(f"arithmetic: {arithmetic}")
    results = [bench_engine(engine, args.n_prompt, args.n_gen, args.reps, name=f"lowbit ({Path(args.model).name})")]
    del engine
    if args.vs_transformers:
        results.append(bench_transformers(model, args.n_prompt, args.n_gen, args.reps))
    if args.vs_llama_cpp:
        results.append(bench_llama_cpp(gguf, results[0].threads, args.n_prompt, args.n_gen, args.reps))
    print(format_speed_table(results))
    if args.json:
        from lowbit.formats.atomic import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"model": args.model, "decode": decode_path, "arithmetic": arithmetic,
                                       "results": [r.to_dict() for r in results]}, indent=1))
