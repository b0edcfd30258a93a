"""Which GGUF type each tensor gets: llama.cpp's file types ("mixes") and its per-tensor rules.

Follows llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for the mixes lowbit writes: the output and
tied token-embedding rule, the attn_v / ffn_down / attn_output bumps of the K-quant mixes (use_more_bits),
the fallbacks for rows that are not a multiple of the block size, `--tensor-type REGEX=TYPE` overrides and
`--pure`. Tensors are named as in GGUF files (blk.N.attn_v.weight); shapes are given as [rows, columns].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError

BLOCK_SIZES = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
               "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: its general.file_type id and the type most tensors get."""

    name: str
    file_type: int
    default: str


MIXES = {m.name: m for m in (
    Mix("F32", 0, "F32"), Mix("F16", 1, "F16"), Mix("BF16", 32, "BF16"),
    Mix("Q4_0", 2, "Q4_0"), Mix("Q4_1", 3, "Q4_1"), Mix("Q8_0", 7, "Q8_0"), Mix("Q5_0", 8, "Q5_0"),
    Mix("Q5_1", 9, "Q5_1"), Mix("Q2_K", 10, "Q2_K"), Mix("Q3_K_S", 11, "Q3_K"), Mix("Q3_K_M", 12, "Q3_K"),
    Mix("Q3_K_L", 13, "Q3_K"), Mix("Q4_K_S", 14, "Q4_K"), Mix("Q4_K_M", 15, "Q4_K"), Mix("Q5_K_S", 16, "Q5_K"),
    Mix("Q5_K_M", 17, "Q5_K"), Mix("Q6_K", 18, "Q6_K"), Mix("Q2_K_S", 21, "Q2_K"),
)}
# a bare K type as --type means the llama.cpp mix of that name's usual default
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def get_mix(name: str) -> Mix:
    """The mix called `name` (case-insensitive; Q4_K means Q4_K_M as in llama-quantize)."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in MIXES:
        raise LowbitError(f"unknown GGUF type {name!r}; choose one of {', '.join(MIXES)}")
    return MIXES[key]


def parse_tensor_types(specs: list[str] | None) -> list[tuple[re.Pattern, str]]:
    """`["attn_v=Q8_0", "ffn_.*=Q5_K"]` -> compiled (regex, type) overrides, with a clear error when malformed."""
    out = []
    for spec in specs or []:
        pattern, sep, type_name = spec.rpartition("=")
        type_name = type_name.upper()
        if not sep or not pattern or type_name not in BLOCK_SIZES:
            raise LowbitError(f"--tensor-type {spec!r} must look like REGEX=TYPE with TYPE one of "
                              f"{', '.join(BLOCK_SIZES)}")
        try:
            out.append((re.compile(pattern), type_name))
        except re.error as exc:
            raise LowbitError(f"--tensor-type {spec!r}: bad regular expression ({exc})") from None
    return out


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    m = re.search(r"\.(attn_v|attn_k|attn_q|attn_output|attn_qkv|ffn_down|ffn_gate|ffn_up)\.weight$", name)
    return m.group(1) if m else "other"


def quantizable(name: str, shape: tuple[int, ...], keep_float: tuple[str, ...] = ()) -> bool:
    """llama.cpp quantizes 2-D `*.weight` tensors except norms and the architecture's float-kept tensors
    (expert routers: `keep_float` holds GGUF tensor kinds such as ffn_gate_inp)."""
    if any(f".{kind}." in name for kind in keep_float):
        return False
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def with_fallback(type_name: str, columns: int) -> str:
    """The type llama.cpp uses when `columns` is not a multiple of the type's block size."""
    if columns % BLOCK_SIZES[type_name] == 0:
        return type_name
    fallback = _FALLBACK.get(type_name, "F16")
    return fallback if columns % BLOCK_SIZES[fallback] == 0 else "F16"


class TypePlanner:
    """Decides tensor types in file order, keeping llama.cpp's running counters of attn_v / ffn_down."""

    def __init__(self, mix: str, n_layers: int, n_head: int, n_head_kv: int, tied_embeddings: bool,
                 tensor_types: list[str] | None = None, pure: bool = False, has_imatrix: bool = False,
                 keep_float: tuple[str, ...] = ()):
        self.keep_float = tuple(keep_float)
        self.mix = get_mix(mix)
        self.n_layers = n_layers
        self.n_gqa = n_head // max(1, n_head_kv)
        self.tied = tied_embeddings
        self.overrides = parse_tensor_types(tensor_types)
        self.pure = pure
        self.has_imatrix = has_imatrix
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def type_for(self, name: str, shape: tuple[int, ...]) -> str:
        """GGUF type of tensor `name` with HF-order shape [rows, ..., columns]."""
        if not quantizable(name, shape, self.keep_float):
            return "F32"
        default = self.mix.default
        columns = shape[-1]
        if default in FLOAT_TYPES:
            return default
        new_type = default
        if not self.pure:
            # like llama.cpp, an override naming the mix's own default type does not stop the mix rules
            manual = next((t for p, t in self.overrides if p.search(name) and t != default), None)
            new_type = manual or self._rules(name, columns, default)
        return with_fallback(new_type, columns)

    def _rules(self, name: str, columns: int, new_type: str) -> str:
        """llama_tensor_get_type_impl for the non-IQ mixes."""
        mix, cat = self.mix.name, _category(name)
        if cat == "output" or (self.tied and cat == "token_embd"):
            if columns % BLOCK_SIZES[new_type]:
                return "Q8_0"
            return new_type if new_type == "Q8_0" else "Q6_K"
        if cat == "attn_v":
            i, n = self.i_attention_wv, self.n_layers
            self.i_attention_wv += 1
            if mix == "Q2_K":
                return "Q4_K" if self.n_gqa >= 4 else "Q3_K"
            if mix == "Q2_K_S" and self.n_gqa >= 4:
                return "Q4_K"
            if mix == "Q3_K_M":
                return "Q5_K" if i < 2 else "Q4_K"
            if mix == "Q3_K_L":
                return "Q5_K"
            if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if mix == "Q4_K_S" and i < 4:
                return "Q5_K"
            return new_type
        if cat == "ffn_down":
            i, n = self.i_ffn_down, self.n_layers
            self.i_ffn_down += 1
            if mix == "Q2_K":
                return "Q3_K"
            if mix == "Q2_K_S":
                return "Q4_K" if i < n // 8 else new_type
            if mix == "Q3_K_M":
                return "Q5_K" if i < n // 16 else "Q4_K"  # llama.cpp: Q4_K for every arch but Falcon
            if mix == "Q3_K_L":
                return "Q5_K"
            if mix in ("Q4_K_M", "Q5_K_M"):
                return "Q6_K" if use_more_bits(i, n) else new_type
            if mix == "Q4_K_S" and i < n // 8:
                return "Q5_K"
            if mix in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:
                return "Q4_1" if mix == "Q4_0" else "Q5_1"
            return new_type
        if cat == "attn_output":
            return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, new_type)
        if cat == "attn_qkv":
            return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(mix, new_type)
        return new_type
