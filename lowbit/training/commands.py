"""`lowbit finetune` and `lowbit merge`: subcommands registered through cli.COMMAND_MODULES."""
from __future__ import annotations

import argparse
import json
import logging


log = logging.getLogger("lowbit")


def add_commands(sub) -> None:
    from lowbit.training.config import DEFAULT_TARGETS, FinetuneConfig

    defaults = FinetuneConfig()
    f = sub.add_parser("finetune", help="train LoRA/QLoRA adapters on a (quantized) base, or quantization-aware "
                                        "training")
    f.add_argument("model", help="base model: a quantized lowbit/GPTQ/AWQ/bnb folder or .gguf (lora), a float "
                                 "model (qlora, qat, or lora with --base-quantize)")
    f.add_argument("--data", required=True, help="training text file (its last --held-out fraction is held out)")
    f.add_argument("-o", "--output", required=True, help="adapter folder (lora/qlora) or quantized model (qat)")
    f.add_argument("--method", default="lora", choices=("lora", "qlora", "qat"))
    f.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (qat: per block)")
    f.add_argument("--lr", type=float, default=None, help="learning rate (default: lora 2e-3; qat 1e-2 of the "
                                                          "weights' rms per step)")
    f.add_argument("--rank", type=int, default=defaults.rank)
    f.add_argument("--alpha", type=float, default=defaults.alpha)
    f.add_argument("--dropout", type=float, default=defaults.dropout)
    f.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS))
    f.add_argument("--seq-len", type=int, default=defaults.seq_len)
    f.add_argument("--batch", type=int, default=defaults.batch)
    f.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    f.add_argument("--seed", type=int, default=defaults.seed)
    f.add_argument("--held-out", type=float, default=defaults.held_out)
    f.add_argument("--optimizer", default=None, choices=("adamw", "adamw8bit"),
                   help="adamw (lora default) or adamw8bit (qlora default)")
    f.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    f.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint/ (same options)")
    f.add_argument("--base-quantize", default=None, help="lora: quantize the float MODEL first (rtn, gptq, nf4)")
    q = f.add_argument_group("qat target (and --base-quantize grid)")
    q.add_argument("--scheme", default=defaults.scheme, help="int (default), nf4, fp4, or a GGUF type (Q4_0, Q4_K)")
    q.add_argument("--bits", type=int, default=defaults.bits)
    q.add_argument("--group-size", type=int, default=defaults.group_size)
    q.add_argument("--asym", action="store_true")
    q.add_argument("--qat-epochs", type=int, default=defaults.qat_epochs)
    q.add_argument("--qat-init", default=defaults.qat_init, help="start each block from gptq's codes (default) or "
                                                                 "rtn (rounding on the MSE-clipped grid)")
    q.add_argument("--no-keep-best", dest="qat_keep_best", action="store_false",
                   help="keep the trained codes even where the start's or GPTQ's are better on held-out windows")
    q.add_argument("--qat-select", default=defaults.qat_select,
                   help="keep_best's judge: model (default: the held-out block error, then the whole model's held-out "
                        "loss for blocks that kept trained codes over GPTQ's) or block (the block error only)")
    q.add_argument("--format", default="lowbit", help="qat output format: lowbit, gptq, awq, bnb, gguf")
    f.add_argument("--json", default=None, help="write the figures to this JSON file")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge", help="merge a LoRA adapter into the base's float weights and re-quantize")
    m.add_argument("base", help="the base model the adapter was trained on")
    m.add_argument("adapter", help="adapter folder (peft format)")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--method", default=None, help="re-quantize the merged layers: rtn, gptq, awq, nf4, qat, ... "
                                                  "(default: keep them float)")
    m.add_argument("--format", default="lowbit", help="lowbit, gptq, awq, bnb, gguf")
    m.add_argument("--bits", type=int, default=4)
    m.add_argument("--group-size", type=int, default=128)
    m.add_argument("--calib", default=None, help="calibration text (the training text is the natural choice)")
    m.add_argument("--calib-samples", type=int, default=128)
    m.add_argument("--calib-len", type=int, default=512)
    m.add_argument("--distill-steps", type=int, default=0,
                   help="then train the re-quantized layers end to end towards the float merged model (KL on the "
                        "calibration windows, straight-through codes, learned scales): keeps far more of the "
                        "adapter's gain than layer-wise re-quantization (README, issue 14); costs a float copy of "
                        "the model and the adapted layers' latent weights and Adam states")
    m.add_argument("--fresh-grid", action="store_true",
                   help="fit new statistics for the merged layers even when the target grid is the base's (default: "
                        "keep the base's scales and zeros, re-choose only the codes)")
    m.set_defaults(func=cmd_merge)


def cmd_finetune(args: argparse.Namespace) -> None:
    from lowbit.training.api import finetune
    from lowbit.training.config import FinetuneConfig

    options = {"method": args.method, "steps": args.steps, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
               "dropout": args.dropout, "target_modules": args.target_modules, "seq_len": args.seq_len,
               "batch": args.batch, "grad_accum": args.grad_accum, "seed": args.seed, "held_out": args.held_out,
               "checkpoint_every": args.checkpoint_every, "scheme": args.scheme, "bits": args.bits,
               "group_size": args.group_size, "symmetric": not args.asym, "qat_epochs": args.qat_epochs,
               "qat_init": args.qat_init, "qat_keep_best": args.qat_keep_best,
               "qat_select": args.qat_select,
               "base_quantize": args.base_quantize}
    if args.optimizer:
        options["optimizer"] = args.optimizer
    config = FinetuneConfig.from_dict(options)
    result = finetune(args.model, args.data, args.output, config, resume=args.resume, format=args.format)
    figures = result.to_dict()
    print(f"held-out perplexity {figures['perplexity_before']:.4f} -> {figures['perplexity_after']:.4f} "
          f"({figures['seconds_per_step']:.3f} s/step); wrote {result.output}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)


def cmd_merge(args: argparse.Namespace) -> None:
    from lowbit.training.api import merge

    options = {}
    if args.method is not None:
        options = {"bits": args.bits, "group_size": args.group_size}
        if args.method in ("gptq", "awq", "qat"):
            options.update(calib_samples=args.calib_samples, calib_len=args.calib_len)
    merge(args.base, args.adapter, args.output, method=args.method, format=args.format, calibration=args.calib,
          keep_grid=not args.fresh_grid, distill_steps=args.distill_steps, **options)
    print(args.output)
