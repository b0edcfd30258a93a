"""Calibration: text sources, layer-by-layer activation capture, and layer-wise streaming from safetensors."""
