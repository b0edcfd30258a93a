"""lowbit: post-training quantization, export, CPU inference and evaluation of causal language models."""
__version__ = "0.1.0"
