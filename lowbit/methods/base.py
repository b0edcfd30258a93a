"""What a quantization method is, its configuration, and the registry that finds one by name.

A method decides the codes for a scheme. Weight-only methods (RTN, NF4, GGUF blocks) override
`quantize_weight`; calibration-based methods (GPTQ, AWQ) override `quantize_block`, which sees one decoder
block and the activations entering it. Either way `quantize_block` returns what it made (a `BlockResult`):
installing the codes, walking the blocks and writing files is `lowbit.methods.walk`'s job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.errors import LowbitError, check_option_type
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
                # an imatrix (Linear name -> vector) is calibration data, not a setting: not recorded
                "options": {k: v for k, v in self.options.items() if k != "importance"}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizeConfig":
        d = dict(d)
        d["skip"] = tuple(d.get("skip", ()))
        return cls(**d)


@dataclass
class BlockResult:
    """What quantizing one decoder block made: codes per Linear (names inside the block) and, for calibrated
    methods, a report per Linear (anything with a `relative_error`, e.g. GPTQReport, AWQReport)."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)

    def install(self, block: nn.Module, kernel: str = "reference") -> None:
        """Put the codes into `block` (each Linear becomes a QuantLinear), so the block runs quantized."""
        from lowbit.runtime.surgery import install_quantized

        for name, qw in self.weights.items():
            install_quantized(block, name, qw, kernel)

    def worst_error(self) -> float | None:
        """The largest relative output error among the reports (None without reports)."""
        return max((r.relative_error for r in self.reports.values()), default=None)


# the calibration options every calibrated method takes (CalibrationRequest's fields and the capture's batch)
CALIBRATION_OPTION_TYPES: dict[str, type] = {"calib_samples": int, "calib_len": int, "seed": int, "chunk": int}


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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
    # option -> its type, checked when the method is made (a string or a truncated float is a one-line error,
    # not a silent bool()/int() cast); options not listed (schemes, per-layer maps) are checked where used
    option_types: ClassVar[dict[str, type]] = {}
    # whether quantize_block picks each layer's codes on `scheme_for(name)` (AWQ searches on its one grid)
    uses_layer_schemes: ClassVar[bool] = True

    def __init__(self, config: QuantizeConfig):
        self.config = config
        # Per-layer schemes chosen before quantization (full module name -> Scheme), e.g. a llama.cpp mix's
        # GGUF type for every Linear; layers not in the plan use `scheme()`. See `plan_layers`.
        self.layer_schemes: dict[str, Scheme] = {}
        unknown = set(config.options) - set(self.option_names())
        if unknown:
            raise LowbitError(f"method {self.name}: unknown options {sorted(unknown)}; "
                              f"it accepts {sorted(self.option_names()) or 'none'}")
        for key, value in config.options.items():
            if value is not None and key in self.option_types:
                check_option_type(f"method {self.name}: option {key}", value, self.option_types[key])

    def option_names(self) -> tuple[str, ...]:
        return ()

    def scheme(self) -> Scheme:
        """The scheme this method picks codes on."""
        raise NotImplementedError

    def scheme_for(self, name: str) -> Scheme:
        """The scheme of the layer `name` (full module name): its planned one, else the method's."""
        planned = self.layer_schemes.get(name)
        return planned if planned is not None else self.scheme()

    def plan_layers(self, model: nn.Module) -> tuple[str, ...]:
        """Choose per-layer schemes before quantization (fills `layer_schemes`); returns the Linears the plan
        keeps in float (added to the skip list). The base method has one scheme for every layer."""
        return ()

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        """Raise a clear error before any work if this layer cannot be quantized with this method."""
        from lowbit.models.adapters import in_out_features

        check = getattr(self.scheme(), "check_width", None)
        if check is not None:
            check(in_out_features(linear)[0], name)

    def quantize_weight(self, name: str, weight: torch.Tensor, importance: torch.Tensor | None = None
                        ) -> QuantizedWeight:
        """Codes for one [N, K] weight of the layer `name` (full module name)."""
        return self.scheme_for(name).quantize(weight, importance)

    def after_block(self, model: nn.Module | None, block: nn.Module, prefix: str, batch: Any,
                    result: BlockResult) -> BlockResult:
        """Called after the walk installed `result` into `block` and before the block's outputs feed the next
        block: `model` is the whole model in memory (blocks before quantized, blocks after still float; None for
        a streamed walk), `batch` the calibration token ids. Methods that choose among codes per block can
        revisit the choice on the model's loss here, installing other codes and returning what they installed."""
        return result

    def quantize_block(self, block: nn.Module, linears: dict[str, nn.Module], inputs: Any = None,
                       arch: Any = None, prefix: str = "") -> BlockResult:
        """Codes for the Linears of one decoder block (`linears`: name inside the block -> Linear-like module;
        `inputs`: the calibration calls entering the block, for calibrated methods; `prefix`: the block's
        module name). Returns them without installing them."""
        from lowbit.models.arch.base import linear_weight

        return BlockResult({name: self.quantize_weight(join_name(prefix, name), linear_weight(lin).detach())
                            for name, lin in linears.items()})
