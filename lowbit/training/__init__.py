"""Training on quantized bases (issue 14): LoRA/QLoRA adapters through peft, quantization-aware training, merging.

`finetune` is the entry point (`lowbit finetune` on the command line); `merge` folds an adapter into float weights
and re-quantizes with any method. Importing this package does not import peft (an optional dependency)."""
from lowbit.training.config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune", "merge"]


def __getattr__(name: str):
    if name in ("finetune", "merge"):
        from lowbit.training import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit.training' has no attribute {name!r}")
