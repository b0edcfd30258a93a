"""`finetune` and `merge`: the Python API behind `lowbit finetune` and `lowbit merge`."""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError, check_option_type
from lowbit.training.config import FinetuneConfig
from lowbit.training.data import TrainingText, training_text
from lowbit.training.trainer import TrainLog, train

log = logging.getLogger("lowbit")

RECORD = "lowbit_finetune.json"
QLORA_BASE = {"method": "nf4", "options": {"double_quant": True, "compute_dtype": "fp32", "blocksize": 64}}


@dataclass
class FinetuneResult:
    """What `finetune` made and measured (held-out perplexity of the training text before and after)."""

    output: Path
    method: str
    perplexity_before: float
    perplexity_after: float
    history: TrainLog
    model: nn.Module | None = field(default=None, repr=False)
    base_quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "method": self.method, "perplexity_before": self.perplexity_before,
                "perplexity_after": self.perplexity_after, "steps": len(self.history.losses),
                "final_loss": self.history.losses[-1] if self.history.losses else None,
                "seconds_per_step": self.history.seconds_per_step, "tokens": self.history.tokens,
                "base_quantization": self.base_quantization}


def held_out_perplexity(model: nn.Module, tokens: torch.Tensor, ctx: int) -> float:
    """Perplexity over non-overlapping windows of `tokens`, in float32 arithmetic."""
    from lowbit.eval.perplexity import evaluate_quality
    from lowbit.runtime.cpu import float32_arithmetic

    was_training = model.training
    model.eval()
    with float32_arithmetic():
        ppl = evaluate_quality(model, tokens, ctx=min(ctx, tokens.numel()), progress=False).perplexity
    model.train(was_training)
    return ppl


def load_base(model: nn.Module | str | Path, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): a path or packaged name is loaded keeping quantized weights quantized."""
    if isinstance(model, nn.Module):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        return model, tokenizer
    from lowbit.models.loading import load_model

    return load_model(model, keep_quantized=True)


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The base's quantization as recorded on the model (method, bits, ...), None for a float model."""
    from lowbit.runtime.surgery import quantized_modules

    config = getattr(model, "lowbit_config", None)
    if config is not None:
        return config.to_dict()
    schemes = sorted({m.qweight.scheme.name for _, m in quantized_modules(model)})
    return {"schemes": schemes} if schemes else None


def quantize_base(model: nn.Module, spec: dict[str, Any], calibration: Any = None) -> None:
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    quantize_model(model, QuantizeConfig.from_dict(spec), calibration=calibration, progress=False)


def finetune(model: nn.Module | str | Path, data: str | Path, output: str | Path, config: FinetuneConfig | None = None,
             resume: bool = False, progress: bool = True, tokenizer: Any = None, format: str = "lowbit",
             **options: Any) -> FinetuneResult:
    """Train on the text file `data` with `config` (or keywords: method="lora", steps=..., see FinetuneConfig).

    lora: peft adapters on the base's Linears or QuantLinears (codes frozen), saved in peft's format to `output`;
    qlora: the float base quantized to NF4 with double quantization first, then lora with 8-bit AdamW;
    qat: block-wise quantization-aware training to `config.scheme`, the quantized model written to `output` in
    `format`. The text's last `held_out` fraction is never trained on: its perplexity is measured before and after.
    """
    if config is not None and options:
        raise LowbitError(f"pass either a FinetuneConfig or options, not both (got {sorted(options)})")
    config = config or FinetuneConfig.from_dict(options)
    output = Path(output).expanduser()
    model, tokenizer = load_base(model, tokenizer)
    text = training_text(tokenizer, data, config.held_out)
    if config.method == "qat":
        if resume:
            raise LowbitError("--resume applies to lora/qlora: qat trains block by block in one pass (no checkpoints)")
        return _qat(model, tokenizer, text, output, config, progress, format)
    if config.method == "qlora":
        if quantization_of(model) is not None:
            raise LowbitError("qlora quantizes a float model to NF4 itself; pass the float model (or use --method "
                              "lora on a quantized base)")
        quantize_base(model, QLORA_BASE)
    elif config.base_quantize:
        quantize_base(model, {"method": config.base_quantize, "bits": config.bits, "group_size": config.group_size,
                              "symmetric": config.symmetric},
                      calibration=text.windows(min(config.seq_len, 512), 32, config.seed))
    base_quantization = quantization_of(model)
    before = held_out_perplexity(model, text.held_out[:config.eval_tokens], config.seq_len)
    from lowbit.training.lora import attach_lora

    peft_model = attach_lora(model, config)
    history = train(peft_model, lambda step, micro: text.batch(config.seq_len, config.batch, config.seed, step, micro),
                    config, checkpoint_dir=output / "checkpoint", resume=resume, progress=progress,
                    desc=f"{config.method} finetune")
    after = held_out_perplexity(peft_model, text.held_out[:config.eval_tokens], config.seq_len)
    peft_model.save_pretrained(str(output))
    result = FinetuneResult(output, config.method, before, after, history, peft_model, base_quantization)
    _write_record(output, config, result, model)
    log.info("held-out perplexity %.4f -> %.4f (%d steps, %.2f s/step); adapter in %s", before, after,
             len(history.losses), history.seconds_per_step, output)
    return result


def base_quantized_on_load(config: FinetuneConfig) -> dict[str, Any] | None:
    """How finetune quantized a float MODEL before training (qlora's NF4, lora's --base-quantize), or None."""
    if config.method == "qlora":
        return QLORA_BASE
    if config.method == "lora" and config.base_quantize:
        return {"method": config.base_quantize, "bits": config.bits, "group_size": config.group_size,
                "symmetric": config.symmetric}
    return None


def prepare_adapter_base(model: nn.Module, adapter: str | Path) -> None:
    """Give an adapter the base it was trained on: when finetune quantized a float model on load (its record says
    how) and `model` is that float model, quantize it the same way, so base + adapter computes what was trained
    and evaluated. A calibrated base (GPTQ, AWQ) cannot be remade without the training text: an error says so."""
    from lowbit.methods.base import QuantizeConfig, get_method

    record_path = Path(adapter).expanduser() / RECORD
    if not record_path.is_file():
        return
    on_load = json.loads(record_path.read_text()).get("base_quantized_on_load")
    if not on_load or quantization_of(model) is not None:
        return
    if get_method(QuantizeConfig.from_dict(on_load)).needs_calibration:
        raise LowbitError(f"adapter {adapter} was trained on this model quantized with {on_load['method']} on load, "
                          "which needs its calibration text: quantize the model with `lowbit quantize` as finetune "
                          "did and pass that folder")
    log.info("the adapter was trained on the base quantized on load (%s): quantizing it the same way",
             on_load["method"])
    quantize_base(model, on_load)


def _write_record(output: Path, config: FinetuneConfig, result: FinetuneResult, model: nn.Module) -> None:
    output.mkdir(parents=True, exist_ok=True)
    record = {"config": config.to_dict(), "result": result.to_dict(),
              "base": getattr(getattr(model, "config", None), "_name_or_path", None),
              "base_quantized_on_load": base_quantized_on_load(config)}
    (output / RECORD).write_text(json.dumps(record, indent=1))


def _qat(model: nn.Module, tokenizer: Any, text: TrainingText, output: Path, config: FinetuneConfig,
         progress: bool, format: str) -> FinetuneResult:
    from lowbit.api import save
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    if quantization_of(model) is not None:
        raise LowbitError("qat starts from the float model; pass the unquantized model")
    before = held_out_perplexity(model, text.held_out[:config.eval_tokens], config.seq_len)
    samples = max(config.batch, config.steps * config.batch // config.qat_epochs)
    windows = text.windows(config.seq_len, samples, config.seed)
    qconfig = QuantizeConfig(method="qat", bits=config.bits, group_size=config.group_size,
                             symmetric=config.symmetric,
                             options={"scheme": config.scheme, "epochs": config.qat_epochs, "chunk": config.batch,
                                      "init": config.qat_init, "keep_best": config.qat_keep_best,
                                      "select": config.qat_select,
                                      "seed": config.seed, **({"lr": config.lr} if config.lr else {})})
    began = time.perf_counter()
    quantize_model(model, qconfig, calibration=windows, progress=progress)
    history = TrainLog(seconds=time.perf_counter() - began, tokens=int(windows.numel()))
    after = held_out_perplexity(model, text.held_out[:config.eval_tokens], config.seq_len)
    writer_options = {"type": config.scheme.upper(), "pure": True} if format == "gguf" else {}
    save(model, output, format=format, tokenizer=tokenizer, **writer_options)
    result = FinetuneResult(output, "qat", before, after, history, model, qconfig.to_dict())
    log.info("qat: held-out perplexity float %.4f -> quantized %.4f; model in %s", before, after, output)
    return result


def merge(base: nn.Module | str | Path, adapter: str | Path, output: str | Path | None = None,
          method: str | None = None, format: str = "lowbit", calibration: Any = None, tokenizer: Any = None,
          scale_steps: int = 0, scale_lr: float = 3e-3, keep_grid: bool = True, distill_steps: int = 0,
          distill_lr: float = 1e-2, distill_scale_lr: float = 1e-3, **quantize_options: Any) -> nn.Module:
    """Fold a LoRA adapter into the base's weights (dequantized from its codes when the base is quantized) and
    re-quantize the merged layers with `method` (rtn, gptq, awq, nf4, qat, ...; None keeps them float), calibrated
    on `calibration` (a text file, token windows or a CalibrationRequest: the training text is the natural
    choice). Layers the adapter does not touch keep the base's codes.

    `keep_grid` (default): an adapted layer whose base is on the very grid `method` targets (same scheme, bits,
    group size) keeps the base's statistics and only its codes are re-chosen (schemes.base.KeptGrid): W_base sits
    on that grid, so rounding W_base + delta errs by at most the delta where no code moves, where a fresh grid
    moves every weight by a whole re-quantization's error.
    `distill_steps` > 0 then trains the re-quantized layers end to end towards the float merged model (KL of the
    next-token distributions on the calibration windows; qat.distill_merged): the whole model's output is matched,
    not each layer's, which is what keeps >= 80% of the adapter's gain at 4 bits (README, issue 14). It holds a
    float copy of the merged model as the teacher. `scale_steps` > 0 trains only the integer grids' scales on the
    language-model loss of the calibration windows (codes fixed; qat.train_scales).
    Writes `output` in `format` when given."""
    for option, value, kind in (("scale_steps", scale_steps, int), ("distill_steps", distill_steps, int),
                                ("scale_lr", scale_lr, float), ("distill_lr", distill_lr, float),
                                ("distill_scale_lr", distill_scale_lr, float), ("keep_grid", keep_grid, bool)):
        check_option_type(f"merge option {option}", value, kind)
        if kind is not bool and value < 0:
            raise LowbitError(f"merge option {option} must be >= 0, got {value!r}")
    if (scale_steps or distill_steps) and method is None:
        raise LowbitError("scale_steps / distill_steps train the re-quantized layers: pass a method to re-quantize "
                          "with (e.g. method='gptq')")
    from lowbit.api import config_from_kwargs, save
    from lowbit.methods.base import CalibrationRequest, get_method
    from lowbit.methods.pipeline import quantize_model
    from lowbit.training.lora import adapted_base_weights, apply_adapter, read_adapter

    model, tokenizer = load_base(base, tokenizer)
    loaded = read_adapter(adapter)
    prepare_adapter_base(model, adapter)
    base_weights = adapted_base_weights(model, loaded)
    apply_adapter(model, loaded)
    if method is not None:
        config = config_from_kwargs(method=method, **quantize_options)
        if not isinstance(calibration, (CalibrationRequest, torch.Tensor)):
            calibration = CalibrationRequest(tokenizer, None if calibration is None else str(calibration),
                                             quantize_options.get("calib_samples", 128),
                                             quantize_options.get("calib_len", 512))
        if scale_steps or distill_steps:    # the same windows for re-quantizing and training (tokenized once)
            calibration = _token_windows(model, calibration)
        kept = kept_grids(get_method(config), base_weights) if keep_grid else {}
        if kept:
            log.info("merge: %d of %d adapted layers re-quantized on the base's own grid (codes chosen anew)",
                     len(kept), len(loaded.modules))
        teacher = copy.deepcopy(model) if distill_steps else None
        quantize_model(model, config, calibration=calibration, progress=False, layer_schemes=kept)
        if distill_steps:
            from lowbit.training.qat import distill_merged

            distill_merged(model, teacher, calibration, loaded.modules, distill_steps,
                           lr=distill_lr, scale_lr=distill_scale_lr)
            del teacher
        if scale_steps:
            from lowbit.training.qat import train_scales

            train_scales(model, calibration, scale_steps, lr=scale_lr)
    model.tokenizer = tokenizer
    if output is not None:
        save(model, output, format=format, tokenizer=tokenizer)
    return model


def _token_windows(model: nn.Module, calibration: Any) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        return calibration
    from lowbit.calibration.text import calibration_batch

    return calibration_batch(model, calibration)


def kept_grids(method: Any, base_weights: dict[str, Any]) -> dict[str, Any]:
    """Adapted layer -> KeptGrid of its base weight, for the layers whose base scheme is the one `method`
    re-quantizes on (same grid: the statistics are kept, only the codes re-chosen); a different target (other
    bits, group size or scheme) or a scheme without column-wise codes (NF4) gets a fresh grid."""
    from lowbit.schemes.base import KeptGrid, Scheme

    if not method.uses_layer_schemes:
        return {}
    column_wise = lambda scheme: type(scheme).grid_position is not Scheme.grid_position  # noqa: E731
    return {name: KeptGrid(qweight) for name, qweight in base_weights.items()
            if qweight.scheme == method.scheme_for(name) and column_wise(qweight.scheme)}
