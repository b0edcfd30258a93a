"""LoRA adapters through peft on any lowbit base, saved in peft's format, and applied or merged back.

peft adapts `nn.Linear`s; lowbit's quantized layers are `QuantLinear`s. They are registered with peft's custom
module mapping (`LoraConfig._register_custom_module`), so peft wraps each targeted QuantLinear in
`QuantLoraLinear`: peft's own LoRA Linear (its lora_A / lora_B, scaling, dropout and state-dict names) around a
base layer whose codes stay frozen and packed. The base product's gradient flows through
`QuantLinear`'s differentiable path (`runtime.qlinear.DequantizedMatmul`: W dequantized per call, forward and
backward, no float copy kept). `model.save_pretrained` then writes adapter_config.json and
adapter_model.safetensors with the same module names a float model has, so peft loads the adapter on the float
base.

Going back, `read_adapter` reads those two files (no peft needed) and `apply_adapter` puts W + scaling * B A
into the adapted layers: the base's own (dequantized) W for a quantized base, so the model computes exactly
what was trained.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.runtime.qlinear import QuantLinear
from lowbit.training.config import FinetuneConfig

log = logging.getLogger("lowbit")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise LowbitError("LoRA training needs peft: pip install 'lowbit[train]'") from exc
    return peft


def _quant_lora_class():
    """peft's LoRA Linear, with a QuantLinear as its base layer (built lazily: peft is an optional dependency)."""
    global _QUANT_LORA
    if _QUANT_LORA is None:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        class QuantLoraLinear(PeftLoraLinear):
            """peft's LoRA Linear whose frozen base is a QuantLinear (codes packed, gradient through them)."""

            def merge(self, *args: Any, **kwargs: Any) -> None:
                raise LowbitError("a quantized base cannot be merged in place by peft; use `lowbit merge BASE "
                                  "ADAPTER -o OUT` (merges into float weights and re-quantizes)")

        _QUANT_LORA = QuantLoraLinear
    return _QUANT_LORA


_QUANT_LORA = None


def lora_config(config: FinetuneConfig):
    """peft's LoraConfig for these options, with QuantLinear registered as a LoRA-able module."""
    peft = require_peft()
    cfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    cfg._register_custom_module({QuantLinear: _quant_lora_class()})
    return cfg


def attach_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """The peft model with fresh adapters (seeded) on every targeted Linear or QuantLinear; the rest frozen."""
    from lowbit.models.skeleton import refuse_engine_only

    refuse_engine_only(model, "train adapters on")
    peft = require_peft()
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise LowbitError(f"--target-modules {','.join(missing)} match no module of this model; its Linears are "
                          f"named {', '.join(sorted(n for n in names if n.endswith('proj')) or ['?'])}")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    wrapped = peft.get_peft_model(model, lora_config(config))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %s: %d trainable parameters", config.rank, ",".join(config.target_modules), trainable)
    return wrapped


# -- adapters back ------------------------------------------------------------------------------------------
@dataclass
class Adapter:
    """A LoRA adapter as saved by peft: per module (full name in the base model) its A [r, K] and B [N, r]."""

    path: Path
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    scaling: float
    config: dict[str, Any]

    def delta(self, name: str) -> torch.Tensor:
        """scaling * B A: what the adapter adds to the [N, K] weight of `name`."""
        return self.scaling * (self.lora_b[name].float() @ self.lora_a[name].float())

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a)


def read_adapter(path: str | Path) -> Adapter:
    """Read a peft LoRA adapter folder; anything lowbit cannot apply exactly is an error naming it."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise LowbitError(f"{path} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                          "(as `lowbit finetune` or peft's save_pretrained write them)")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LowbitError(f"{path}: adapter type {config.get('peft_type')} is not LoRA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        if config.get(key):
            raise LowbitError(f"{path}: LoRA option {key}={config[key]!r} is not supported; train without it")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part, table in ((".lora_A.weight", lora_a), (".lora_B.weight", lora_b)):
            if name.endswith(part):
                table[name[: -len(part)]] = value
                break
        else:
            raise LowbitError(f"{path}: tensor {key} is not a LoRA A/B weight (bias or embedding adapters are not "
                              "supported)")
    if set(lora_a) != set(lora_b) or not lora_a:
        raise LowbitError(f"{path}: lora_A and lora_B weights do not pair up; the adapter is incomplete")
    return Adapter(path, lora_a, lora_b, scaling, config)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The float32 [N, K] weight a Linear or QuantLinear computes with."""
    from lowbit.models.arch.base import linear_weight

    if isinstance(module, QuantLinear):
        return module.qweight.dequantize()
    return linear_weight(module).detach().float()


def adapted_base_weights(model: nn.Module, adapter: Adapter) -> dict[str, Any]:
    """The QuantizedWeight of every layer `adapter` adapts whose base is quantized (full name -> weight)."""
    modules = dict(model.named_modules())
    return {name: modules[name].qweight for name in adapter.modules if isinstance(modules.get(name), QuantLinear)}


def apply_adapter(model: nn.Module, adapter: Adapter | str | Path) -> list[str]:
    """Merge the adapter into `model` on the fly: each adapted layer becomes a float nn.Linear holding
    W + scaling * B A (W dequantized from the base's codes for a quantized layer), so every runtime path (the
    engine's compiled step included) runs base + adapter with the float arithmetic of the merged weight; the
    other layers stay as they are. Returns the adapted module names."""
    from lowbit.models.skeleton import refuse_engine_only
    from lowbit.runtime.surgery import replace_module

    refuse_engine_only(model, "apply an adapter to")

    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    for name in adapter.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"adapter {adapter.path} adapts {name}, which this model does not have; pass the base "
                              "model it was trained on") from None
        weight = base_weight(module)
        delta = adapter.delta(name)
        if delta.shape != weight.shape:
            raise LowbitError(f"adapter {adapter.path}: {name} is {tuple(delta.shape)} but the model's layer is "
                              f"{tuple(weight.shape)}; pass the base model it was trained on")
        bias = getattr(module, "bias", None)
        merged = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        merged.weight.data = weight + delta
        if bias is not None:
            merged.bias.data = bias.detach().float().clone()
        merged.requires_grad_(False)
        replace_module(model, name, merged)
    log.info("adapter %s merged on the fly into %d layers (float)", adapter.path, len(adapter.modules))
    return adapter.modules
