"""Typed options of `lowbit finetune` (and `lowbit.training.finetune`): one dataclass, unknown options are errors."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lowbit.errors import LowbitError, check_option_type

METHODS = ("lora", "qlora", "qat")
OPTIMIZERS = ("adamw", "adamw8bit")
QAT_INITS = ("gptq", "rtn")      # lowbit.methods.qat.QAT_INITS (not imported: this module stays torch-free)
QAT_SELECTS = ("model", "block")  # lowbit.methods.qat.QAT_SELECTS
# Every projection of a Llama-family block: the QLoRA paper's finding is that adapting all of them matters more
# than the rank.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"lora": 2e-3, "qlora": 2e-3, "qat": 1e-4}


@dataclass
class FinetuneConfig:
    """What to train and how. `lr` None picks the method's default (DEFAULT_LR)."""

    method: str = "lora"
    steps: int = 100
    lr: float | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seq_len: int = 256
    batch: int = 4
    grad_accum: int = 1
    seed: int = 0
    held_out: float = 0.1          # fraction of the text (its end) never trained on, for held-out perplexity
    eval_tokens: int = 16384       # held-out tokens the perplexity is measured on (the first ones)
    optimizer: str | None = None   # adamw | adamw8bit (bitsandbytes' 8-bit states); None: adamw8bit for qlora
                                   # (the QLoRA recipe), adamw otherwise
    weight_decay: float = 0.0
    warmup: int = 10               # linear warm-up steps, then cosine decay to 10% of lr
    checkpoint_every: int = 50     # steps between checkpoints (0: only at the end)
    # qat: the target grid and the block-wise reconstruction (see lowbit.methods.qat)
    scheme: str = "int"            # int | nf4 | Q4_0 | Q4_K | any GGUF type
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    qat_epochs: int = 4            # passes over the calibration windows per block
    qat_init: str = "gptq"         # where each block's training starts: gptq (GPTQ's codes first) | rtn
    qat_keep_best: bool = True     # each block keeps the best of trained / start / GPTQ codes on held-out windows
    qat_select: str = "model"      # keep_best judged on the block error only (block) or then on the model loss too
    base_quantize: str | None = None   # lora: quantize the float MODEL on load with this method first (rtn, gptq)
    extra: dict[str, Any] = field(default_factory=dict)   # not options: reserved for callers' notes

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise LowbitError(f"unknown finetune method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer is None:
            self.optimizer = "adamw8bit" if self.method == "qlora" else "adamw"
        if self.qat_init not in QAT_INITS:
            raise LowbitError(f"--qat-init must be one of {', '.join(QAT_INITS)} (got {self.qat_init!r})")
        if self.qat_select not in QAT_SELECTS:
            raise LowbitError(f"--qat-select must be one of {', '.join(QAT_SELECTS)} (got {self.qat_select!r})")
        if self.optimizer not in OPTIMIZERS:
            raise LowbitError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        for name, low, high in (("dropout", 0.0, 1.0), ("alpha", 0.0, None), ("warmup", 0, None),
                                ("checkpoint_every", 0, None), ("weight_decay", 0.0, None)):
            value = getattr(self, name)
            if value < low or (high is not None and value >= high) or (name == "alpha" and value == 0):
                bound = f"in [{low}, {high})" if high is not None else (f"> {low}" if name == "alpha" else f">= {low}")
                raise LowbitError(f"--{name.replace('_', '-')} must be {bound} (got {value})")
        for name in ("steps", "rank", "seq_len", "batch", "grad_accum", "qat_epochs", "eval_tokens"):
            if int(getattr(self, name)) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not 0 < self.held_out < 1:
            raise LowbitError(f"held_out must be a fraction between 0 and 1 (got {self.held_out})")
        if self.lr is not None and not self.lr > 0:
            raise LowbitError(f"--lr must be > 0 (got {self.lr})")
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t for t in self.target_modules.split(",") if t)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise LowbitError("--target-modules is empty; name the Linears to adapt (e.g. q_proj,v_proj)")

    def _check_types(self) -> None:
        """Each option has its default's type (int options take ints, float ones ints or floats; None where the
        default is None): a string or a truncated float is an error, not a traceback or a silent cast."""
        nullable = {"lr": float, "base_quantize": str, "optimizer": str}
        for f in fields(self):
            if f.name in ("target_modules", "extra"):
                continue
            value, expected = getattr(self, f.name), nullable.get(f.name, type(f.default))
            if value is None and f.name in nullable:
                continue
            check_option_type(f"finetune option {f.name}", value, expected)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def lora_scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """Build from keywords; an unknown key is an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LowbitError(f"unknown finetune options {unknown}; known: {', '.join(sorted(known - {'extra'}))}")
        return cls(**d)
