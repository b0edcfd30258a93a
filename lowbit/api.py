"""The Python API: load, quantize, save."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.methods.base import CalibrationRequest, QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.models.loading import load_model


def config_from_kwargs(**kwargs: Any) -> QuantizeConfig:
    """A QuantizeConfig from keywords: its own fields by name, anything else a method option (double_quant=...)."""
    fields = set(QuantizeConfig.__dataclass_fields__)
    options = dict(kwargs.pop("options", {}) or {})
    options.update({k: kwargs.pop(k) for k in list(kwargs) if k not in fields})
    return QuantizeConfig(**kwargs, options=options)


def load(path: str | os.PathLike, quantize: str | QuantizeConfig | None = None, kernel: str = "auto",
         keep_quantized: bool = False, **quantize_options: Any) -> nn.Module:
    """Load a model from a folder, .gguf file or packaged name; optionally quantize it on load.

    `quantize` is a method name ("rtn", "nf4", "int8", ...) or a QuantizeConfig. The tokenizer is at
    `model.tokenizer`. `keep_quantized` loads a .gguf without dequantizing its blocks (when supported).
    """
    model, tokenizer = load_model(path, kernel=kernel, keep_quantized=keep_quantized)
    if quantize is not None:
        config = quantize if isinstance(quantize, QuantizeConfig) else config_from_kwargs(method=quantize,
                                                                                         **quantize_options)
        quantize_model(model, config, calibration=CalibrationRequest(tokenizer), kernel=kernel)
    model.tokenizer = tokenizer
    return model


def quantize(model_or_path: nn.Module | str | os.PathLike, config: QuantizeConfig | dict | None = None,
             calibration: CalibrationRequest | None = None, progress: bool = True, **config_fields: Any
             ) -> nn.Module:
    """Quantize a model (in place) or the model at a path; returns the quantized model."""
    model = model_or_path if isinstance(model_or_path, nn.Module) else load(model_or_path)
    if isinstance(config, dict):
        config = config_from_kwargs(**config)
    config = config or config_from_kwargs(**config_fields)
    if calibration is None:
        calibration = CalibrationRequest(getattr(model, "tokenizer", None))
    return quantize_model(model, config, calibration=calibration, progress=progress)


def save(model: nn.Module, out: str | os.PathLike, format: str = "lowbit", tokenizer: Any = None,
         **options: Any) -> Path:
    """Write `model` to `out` in `format` ("lowbit", "gptq", "awq", "bnb", "gguf"), atomically; `options` are
    the writer's (e.g. gguf: type, tensor_types, pure, importance, imatrix_data), and unknown ones are errors."""
    from lowbit.formats.registry import get_writer

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    return Path(get_writer(format).save(model, tokenizer, Path(out), **options))
