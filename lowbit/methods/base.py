"""What a quantization method is, its configuration, and the registry that finds one by name.

A method decides the codes for a scheme. Weight-only methods (RTN, NF4, GGUF blocks) override
`quantize_weight`; calibration-based methods (GPTQ, AWQ) override `quantize_block`, which sees one decoder
block and the activations entering it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.schemes.base import Scheme

_METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to `lowbit quantize --method NAME`."""
    for name in (cls.name, *cls.aliases):
        _METHODS[name] = cls
    return cls


def get_method(config: "QuantizeConfig") -> "Method":
    """Instantiate the method named in `config`, with a clear error for unknown names."""
    import lowbit.methods  # noqa: F401  (registers every built-in method)

    if config.method not in _METHODS:
        raise LowbitError(f"unknown method {config.method!r}; choose one of: {', '.join(known_methods())}")
    return _METHODS[config.method](config)


def known_methods() -> list[str]:
    import lowbit.methods  # noqa: F401

    return sorted(_METHODS)


@dataclass
class QuantizeConfig:
    """Everything `lowbit quantize` needs; `options` carries method-specific settings (damp, blocksize, ...)."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = False
    skip: tuple[str, ...] = ("lm_head",)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "clip_search": self.clip_search, "skip": list(self.skip),
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizeConfig":
        d = dict(d)
        d["skip"] = tuple(d.get("skip", ()))
        return cls(**d)


@dataclass
class CalibrationRequest:
    """What calibration-based methods need to build their calibration batches.

    text_file None means: generate calibration text with the model itself (seeded), and say so.
    """

    tokenizer: Any
    text_file: str | None = None
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0


class Method:
    """Base class: quantize every Linear of a block independently with `quantize_weight`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: QuantizeConfig):
        self.config = config
        unknown = set(config.options) - set(self.option_names())
        if unknown:
            raise LowbitError(f"method {self.name}: unknown options {sorted(unknown)}; "
                              f"it accepts {sorted(self.option_names()) or 'none'}")

    def option_names(self) -> tuple[str, ...]:
        return ()

    def scheme(self) -> Scheme:
        """The scheme this method picks codes on."""
        raise NotImplementedError

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        """Raise a clear error before any work if this layer cannot be quantized with this method."""
        from lowbit.models.adapters import in_out_features

        check = getattr(self.scheme(), "check_width", None)
        if check is not None:
            check(in_out_features(linear)[0], name)

    def quantize_weight(self, name: str, weight: torch.Tensor, importance: torch.Tensor | None = None
                        ) -> QuantizedWeight:
        """Codes for one [N, K] weight."""
        return self.scheme().quantize(weight, importance)

    def quantize_block(self, block: nn.Module, linears: dict[str, nn.Linear], inputs: Any = None
                       ) -> dict[str, QuantizedWeight]:
        """Quantize the Linears of one decoder block; `inputs` are calibration activations when needed."""
        return {name: self.quantize_weight(name, lin.weight.detach()) for name, lin in linears.items()}
