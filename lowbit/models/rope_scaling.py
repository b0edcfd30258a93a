"""llama.cpp's rope_freqs tensor <-> transformers' "llama3" rope scaling (Llama 3.1, 3.2, 3.3).

Llama 3.x divide the rope frequencies by a per-frequency factor: 1 for short wavelengths, `factor` for long ones, and
1 / ((1 - s) / factor + s) in between, with s = (original_context / wavelength - low_freq_factor) /
(high_freq_factor - low_freq_factor) (transformers' _compute_llama3_parameters). llama.cpp's convert_hf_to_gguf.py
writes no metadata for it: it stores those divisors as the float32 tensor rope_freqs.weight (head_dim / 2 values)
and llama.cpp divides each frequency by its value (ggml_rope_ext's freq_factors).

Export writes the tensor from transformers' own frequencies (`rope_divisors`). Import has only the divisors, so it
derives rope parameters that reproduce them (`config_with_rope_freqs`): only the ratios of the three wavelengths to
the original context are determined, so the original context is the file's rope.scaling.original_context_length, or
Llama 3's 8192; then transformers' computation of the derived parameters must give the file's divisors (relative
1e-5), or the file is refused: nothing is run with frequencies the file does not hold.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from lowbit.errors import CorruptFile, UnsupportedArchitecture

ROPE_FREQS = "rope_freqs.weight"        # gguf-py's MODEL_TENSOR.ROPE_FREQS
ORIGINAL_CONTEXT_KEY = "rope.scaling.original_context_length"   # gguf-py's Keys.Rope.SCALING_ORIG_CTX_LEN
LLAMA3_ORIGINAL_CONTEXT = 8192          # Llama 3.x's pre-training context (convert_hf_to_gguf assumes it too)
DIVISOR_TOLERANCE = 1e-5                # relative: float32 divisors computed by another program's arithmetic
LLAMA3_BAND = 4.0                       # high_freq_factor / low_freq_factor of every Llama 3.x release


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled rope inverse frequencies, float32, computed as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def rope_divisors(config: Any) -> torch.Tensor:
    """Per-frequency divisors of a llama3-scaled config: transformers' default inverse frequencies over its llama3
    ones (what llama.cpp's rope_freqs holds), float32."""
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaled, _ = _compute_llama3_parameters(config)
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return default_inv_freq(float(params["rope_theta"]), int(head_dim)) / scaled


def is_llama3_scaled(config: Any) -> bool:
    params = getattr(config, "rope_parameters", None) or {}
    return isinstance(params, dict) and params.get("rope_type") == "llama3"


def config_with_rope_freqs(gf: Any, gguf_arch: str, kwargs: dict[str, Any], build: Callable[[dict], Any]) -> Any:
    """The config `build(kwargs)` gives, with rope parameters reproducing the file's rope_freqs.weight: default rope
    when every divisor is 1, else llama3 parameters checked against the divisors with transformers' computation."""
    path = gf.path
    if gguf_arch != "llama":
        raise UnsupportedArchitecture(f"{path}: a {gguf_arch} file with {ROPE_FREQS} (rope frequency factors) is not "
                                      "supported; lowbit reads them in llama files (Llama 3.x rope scaling)")
    head_dim = int(kwargs["head_dim"])
    divisors = checked_divisors(gf.tensors[ROPE_FREQS], head_dim, path)
    theta = float(kwargs["rope_theta"])
    if not (math.isfinite(theta) and theta > 1):
        raise CorruptFile(f"{path}: {gguf_arch}.rope.freq_base is {theta}; rope frequencies need a finite base above 1")
    if np.all(np.abs(divisors - 1.0) <= DIVISOR_TOLERANCE):
        return build(kwargs)
    original = gf.metadata.get(f"{gguf_arch}.{ORIGINAL_CONTEXT_KEY}", LLAMA3_ORIGINAL_CONTEXT)
    if not isinstance(original, int) or isinstance(original, bool) or not 0 < original <= 2 ** 31:
        raise CorruptFile(f"{path}: {gguf_arch}.{ORIGINAL_CONTEXT_KEY} is {original!r}, not a context length")
    rest = {k: v for k, v in kwargs.items() if k != "rope_theta"}
    inv_freq = default_inv_freq(theta, head_dim).double().numpy()
    worst = None
    with np.errstate(divide="ignore", invalid="ignore"):    # frequencies that underflow make no band, not warnings
        candidates = llama3_candidates(divisors, inv_freq, original)
    for params in candidates:
        config = build({**rest, "rope_parameters": {"rope_type": "llama3", "rope_theta": theta, **params}})
        got = rope_divisors(config).double().numpy()
        error = np.abs(got - divisors) / divisors
        if error.max() <= DIVISOR_TOLERANCE:
            return config
        i = int(error.argmax())
        if worst is None or error[i] < worst[0]:
            worst = (error[i], i, got[i], params)
    if worst is not None:
        detail = (f"divisor {worst[1]} is {divisors[worst[1]]:.7g} where the closest llama3 curve "
                  f"({_shown(worst[3])}) gives {worst[2]:.7g}")
    else:
        largest = divisors.max()
        ramp = np.flatnonzero((divisors > 1 + DIVISOR_TOLERANCE) & (divisors < largest * (1 - DIVISOR_TOLERANCE)))
        detail = (f"the divisors between 1 and the largest ({largest:.7g}), at {ramp.tolist()[:8]}, lie on no llama3 "
                  "ramp (1 / divisor linear in the frequency, rising from 1 / largest at a positive frequency to 1)")
    raise CorruptFile(f"{path}: {ROPE_FREQS} fits no llama3 rope scaling: {detail}")


def checked_divisors(tensor: Any, head_dim: int, path: Any) -> np.ndarray:
    """rope_freqs.weight's values (float64) once they are a float vector of head_dim / 2 finite values >= 1."""
    if tensor.is_quantized or tuple(tensor.shape) != (head_dim // 2,):
        raise CorruptFile(f"{path}: {ROPE_FREQS} is {tensor.type_name} {list(tensor.shape)}, not a float vector of "
                          f"head_dim / 2 = {head_dim // 2} frequency factors")
    values = np.asarray(tensor.to_float(), dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(values) | (values < 1.0 - DIVISOR_TOLERANCE)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CorruptFile(f"{path}: {ROPE_FREQS}[{i}] is {values[i]}; frequency divisors are finite and at least 1")
    return values


def llama3_candidates(divisors: np.ndarray, inv_freq: np.ndarray, original: int) -> list[dict[str, Any]]:
    """llama3 rope parameters that may reproduce `divisors` (to be checked), most likely first.

    With u = original * inv_freq / (2 pi) (original context over wavelength), a divisor d gives
    s = (1 / d - 1 / factor) / (1 - 1 / factor): 1 where frequencies are kept, 0 where divided by `factor` (the
    largest divisor), and linear in u in between, s = (u - low_freq_factor) / (high_freq_factor - low_freq_factor).
    Two or more frequencies in between determine the line; with one or none only the band around it is known, so
    Llama 3's band (high = 4 x low) is tried first, then a band between the neighbouring frequencies."""
    u = original * inv_freq / (2 * math.pi)           # decreasing: frequency 0 is the shortest wavelength
    factor = float(divisors.max())
    s = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    kept = divisors <= 1.0 + DIVISOR_TOLERANCE
    divided = divisors >= factor * (1.0 - DIVISOR_TOLERANCE)
    between = np.flatnonzero(~kept & ~divided)
    bands: list[tuple[float, float]] = []
    if len(between) >= 2:
        slope, intercept = np.polyfit(u[between], s[between], 1)
        bands.append(_band_through(slope, intercept))
    elif len(between) == 1:
        m = int(between[0])
        low = u[m] / (1 + (LLAMA3_BAND - 1) * s[m])   # s = (u - low) / (3 low) at u[m]
        bands.append((low, LLAMA3_BAND * low))
        neighbour, s_neighbour = (m - 1, 1.0) if m > 0 else (m + 1, 0.0)
        slope = (s[m] - s_neighbour) / (u[m] - u[neighbour])
        bands.append(_band_through(slope, s[m] - slope * u[m]))
    else:
        first = int(np.flatnonzero(divided)[0])       # kept below `first`, divided from it on
        if first == 0:                                # every frequency divided: the band lies above them all
            bands.append((2 * u[0], 2 * LLAMA3_BAND * u[0]))
        else:
            centre = math.sqrt(u[first] * u[first - 1])
            bands.append((centre / math.sqrt(LLAMA3_BAND), centre * math.sqrt(LLAMA3_BAND)))
            third = (u[first - 1] / u[first]) ** (1 / 3)
            bands.append((u[first] * third, u[first - 1] / third))
    out: list[dict[str, Any]] = []
    for low, high in bands:
        if not (0 < low < high and math.isfinite(high)):
            continue
        for digits in (4, 6, None):                   # round numbers first (Llama 3: 8, 1, 4), when they fit
            params = {"factor": _rounded(factor, digits), "low_freq_factor": _rounded(low, digits),
                      "high_freq_factor": _rounded(high, digits), "original_max_position_embeddings": original}
            if params not in out:
                out.append(params)
    return out


def _band_through(slope: float, intercept: float) -> tuple[float, float]:
    """(low_freq_factor, high_freq_factor) of the line s = slope * u + intercept: where s is 0 and where it is 1."""
    if slope <= 0:
        return (0.0, 0.0)
    return (-intercept / slope, (1.0 - intercept) / slope)


def _rounded(value: float, digits: int | None) -> float:
    return float(f"{value:.{digits}g}") if digits else float(value)


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in params.items())
