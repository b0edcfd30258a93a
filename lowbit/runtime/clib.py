"""lowbit's compiled kernels (runtime/csrc): building the library for this CPU, and describing weights to it.

The C sources are compiled with the machine's C compiler on first use (or at install time by `make setup`, which
calls `build_native()`) with -march=native and OpenMP (plus LOWBIT_CFLAGS, for experiments), cached by source,
CPU flags and those flags. With no compiler, or a failed build, `native_library()` is None and every caller falls
back to torch kernels.

`linear_spec(module)` turns a Linear (float, or a QuantLinear whose weight is affine per group, act-order too, or
an NF4/FP4 codebook, or GGUF blocks) into the `lb_linear` structure of csrc/affine_dot.h; GGUF blocks are read
where they lie (csrc/ggml_blocks.h: the mmapped file's bytes, no copy), other 4-bit codes are re-packed two per
byte (LB_NIB), wider codes are read one per byte (LB_U8).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.runtime.activations import Activations
from lowbit.runtime.checks import buffer_sizes, check_linear, check_status
from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight, keep_codes_packed, keep_statistics_compact, packed_codes

log = logging.getLogger("lowbit")

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "affine_gemv.c", CSRC / "decode.c",   # one library; decode.c is the engine's whole-step kernel
           CSRC / "checks.c")       # size checks of weight descriptions, status words (runtime/checks.py)
LB_F32, LB_U8, LB_NIB, LB_F16, LB_BF16 = 0, 1, 2, 3, 4
# a float Linear's weight dtype -> the kind the kernels read it as, where it lies (no float32 copy)
FLOAT_KINDS = {torch.float32: LB_F32, torch.float16: LB_F16, torch.bfloat16: LB_BF16}
# csrc/ggml_blocks.h: a GGUF block type is read as the file stores it, kind LB_GGML + its ggml_type value
LB_GGML = 16
GGML_KINDS = {"Q4_0": LB_GGML + 2, "Q4_1": LB_GGML + 3, "Q5_0": LB_GGML + 6, "Q5_1": LB_GGML + 7, "Q8_0": LB_GGML + 8,
              "Q2_K": LB_GGML + 10, "Q3_K": LB_GGML + 11, "Q4_K": LB_GGML + 12, "Q5_K": LB_GGML + 13,
              "Q6_K": LB_GGML + 14}
LB_STATS_F32, LB_STATS_F16, LB_STATS_F16_OFFSET, LB_STATS_F32_OFFSET = 0, 1, 2, 3
_LIBRARY: ctypes.CDLL | None = None
_LIBRARY_TRIED = False
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
# id(weight) -> (weakref to it, the tensors its numbers come from (_stored_state), its C description): one packed
# copy per weight, dropped with it
_DESCRIBED: dict[int, tuple[Any, tuple[Any, ...], Any]] = {}


class LinearSpec(ctypes.Structure):
    """csrc/affine_dot.h's lb_linear: one weight as the C kernels read it."""

    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("groups", _i64), ("group", _i64),
                ("w", _ptr), ("a", _ptr), ("b", _ptr), ("bias", _ptr), ("stats", _i64), ("offset", ctypes.c_float),
                ("perm", _ptr), ("table", _ptr)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _extra_cflags() -> list[str]:
    """Compiler flags LOWBIT_CFLAGS adds to the -march=native build, for experiments (e.g.
    -DLB_GGML_PREFETCH_BYTES=4096). They are part of the library's cache key, so each setting builds its own; the
    portable build never takes them (it must stay portable)."""
    text = os.environ.get("LOWBIT_CFLAGS", "")
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise LowbitError(f"LOWBIT_CFLAGS={text!r} cannot be split into compiler flags ({exc}); "
                          "fix its quoting or unset it") from None


def native_library_path() -> Path:
    """Where the compiled library for these sources and this CPU lives (package folder, else the user cache)."""
    source_bytes = b"".join(path.read_bytes() for path in sorted(CSRC.iterdir()) if path.suffix in (".c", ".h"))
    extra = "\0".join(_extra_cflags()).encode()
    key = hashlib.sha256(source_bytes + _cpu_flags().encode() + extra).hexdigest()[:16]
    name = f"lowbit_kernels-{key}.so"
    package_dir = Path(__file__).with_name("_native")
    if os.access(package_dir if package_dir.exists() else package_dir.parent, os.W_OK):
        return package_dir / name
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / name


def compile_library(target: Path, march_native: bool = True) -> subprocess.CompletedProcess:
    """Compile csrc/*.c into the shared library `target` (atomically); -march=native for this CPU's instruction
    sets, else a portable build whose kernels are plain loops."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return subprocess.CompletedProcess(["cc"], 127, "", "no C compiler found")
    flags = ["-march=native", *_extra_cflags()] if march_native else []
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    # an undeclared function would otherwise compile into a library that fails to load (undefined symbol)
    cmd = [compiler, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-Werror=implicit-function-declaration",
           "-o", tmp, *map(str, SOURCES), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        os.replace(tmp, target)        # atomic: a concurrent build never sees half a library
    else:
        os.unlink(tmp)
    result.args = cmd
    return result


def build_native(verbose: bool = False) -> Path | None:
    """Build the library for this CPU once (cached by sources, CPU flags and LOWBIT_CFLAGS); its path, or None on
    failure."""
    target = native_library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for march_native in (True, False):   # a compiler that refuses -march=native still builds a portable one
        result = compile_library(target, march_native)
        if result.returncode == 0:
            if verbose:
                print(" ".join(result.args))
            return target
        log.debug("kernel build failed: %s\n%s", " ".join(map(str, result.args)), result.stderr)
    # an experiment's flags that break the build must not pass unnoticed as a slow run on torch's kernels
    (log.warning if _extra_cflags() else log.info)(
        "could not compile lowbit's kernels (%s); torch kernels are used", result.stderr.strip()[:200])
    return None


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel library and declare its functions' argument types."""
    lib = ctypes.CDLL(str(path))   # torch is imported first, so its libgomp is the one shared
    i32 = ctypes.c_int
    # Every entry point that writes through a pointer takes that buffer's size and returns a status (csrc/checks.h):
    # 0, or a code checks.check_status turns into a LowbitError; sizes are counted in values (floats, int64) or bytes.
    signatures = {
        "lowbit_linear": [_ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, i32, i32],  # weight, x, M, y, scratch
        "lowbit_linear_scratch": [_ptr, _i64, i32, ctypes.POINTER(_i64)],
        "lowbit_dequantize_rows": [_ptr, _i64, _i64, _ptr, _i64, i32, i32],            # weight, n0, n1, out, bytes
        "lowbit_decode_workspace": [_ptr, _i64, i32, ctypes.POINTER(_i64)],
        # model, x, B, slots, positions, logits, workspace, k and v cache floats, threads, logit rows (or NULL)
        "lowbit_decode_step": [_ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64,
                               i32, _ptr, _i64],
        "lowbit_check_model": [_ptr, ctypes.c_char_p, _i64],
        # logits, their floats, rows, vocab, temperature, uniforms, their count, tokens, their count, threads
        "lowbit_sample_rows": [_ptr, _i64, _i64, _i64, ctypes.c_float, _ptr, _i64, _ptr, _i64, i32],
        "lowbit_check_linear": [_ptr] + [_i64] * 6,
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = i32 if name != "lowbit_check_linear" else _i64
    lib.lowbit_status_text.argtypes = [_i64]
    lib.lowbit_status_text.restype = ctypes.c_char_p
    lib.lowbit_has_act8.restype = i32
    lib.lowbit_amx.argtypes = [i32]     # 0 off, 1 on (if this process may use the tile unit), -1 ask; 1 if on
    lib.lowbit_amx.restype = i32
    lib.lowbit_uses_act8.argtypes = [_ptr, i32]
    lib.lowbit_uses_act8.restype = i32
    lib.lowbit_amx_fits.argtypes = [_ptr, ctypes.c_int64, i32]
    lib.lowbit_amx_fits.restype = i32
    lib.lowbit_kernel_has_avx512.restype = i32
    return lib


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when it cannot be built or loaded."""
    global _LIBRARY, _LIBRARY_TRIED
    if _LIBRARY_TRIED:
        return _LIBRARY
    _LIBRARY_TRIED = True
    if os.environ.get("LOWBIT_NO_NATIVE"):
        return None
    path = build_native()
    if path is None:
        return None
    try:
        _LIBRARY = load_library(path)
    except OSError as exc:
        log.info("could not load %s (%s); torch kernels are used", path, exc)
    return _LIBRARY


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (< 16, K % 32 == 0) -> [N, K/2] in the LB_NIB layout: per 32-column chunk,
    byte j = column j (low nibble) | column 16 + j (high nibble)."""
    n, k = codes.shape
    chunks = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of pack_nibbles: [N, K/2] LB_NIB bytes -> uint8 codes [N, K]."""
    chunks = packed.reshape(packed.shape[0], columns // 32, 1, 16)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(packed.shape[0], columns)


def _codes_from_nibbles(packed: torch.Tensor, columns: int, order: torch.Tensor | None) -> torch.Tensor:
    """The logical codes of a weight whose nibbles hold its columns in `order` (act-order groups made contiguous)."""
    stored = unpack_nibbles(packed, columns)
    if order is None:
        return stored
    codes = torch.empty_like(stored)
    codes[:, order] = stored
    return codes


def keep_kernel_layout(qw: QuantizedWeight) -> bool:
    """Make the compiled kernels' LB_NIB bytes the only copy of a 4-bit weight's codes (the one-byte codes a
    method or reader made are dropped; `qw.codes` unpacks them on access) and hold its float32 statistics in the
    narrowest exact dtype (`keep_statistics_compact`). True when done; False when the kernels
    read this weight another way (GGUF blocks, wider codes, widths the nibble layout cannot split, no compiled
    library), which then keeps its codes as they are.

    The bytes are the ones `affine_spec` describes to the kernels (its choice of layout and column order), so
    the packed copy and the description cannot disagree."""
    if native_library() is None or qw.__dict__.get("_codes") is None:
        return False
    described = affine_spec(qw)
    if described is None or described[0].kind != LB_NIB:
        return False
    nibbles = described[1][0]
    order = column_order(qw) if qw.scheme.affine_form(qw) is not None else None   # as _describe_affine ordered them
    # a partial of a module-level function, not a lambda: models are copied and pickled (deepcopy, torch.save)
    keep_codes_packed(qw, nibbles, functools.partial(_codes_from_nibbles, columns=qw.in_features, order=order))
    keep_statistics_compact(qw, shared=tuple(described[1][1:]))   # the description's float16 scales, held once
    # the description stays valid (it reads these very bytes); recorded against the packed codes, not the one-byte
    # codes it was made from, so the cache does not keep those alive (a 1B model's: 1 GB until the next describe)
    ref, _, description = _DESCRIBED[id(qw)]
    _DESCRIBED[id(qw)] = (ref, _stored_state(qw), description)
    return True


def nibble_layout_fits(bits: int, in_features: int, group: int) -> bool:
    """True when 4-bit codes of this width and group size can use the LB_NIB layout."""
    return bits <= 4 and in_features % 32 == 0 and (group == 16 or group % 32 == 0)


def affine_spec(qw: QuantizedWeight, bias: torch.Tensor | None = None
                ) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    """The C description of a quantized weight with an affine form per group (codes <= 8 bits, act-order too)
    or an NF4/FP4 codebook, and the tensors it points into (keep them alive); None if the C kernels cannot
    read it.

    The packed codes are made once per weight and cached in `_DESCRIBED` (by the weight's identity, dropped
    with it), so the per-layer kernel and the engine's compiled step share one copy."""
    cached, state = _DESCRIBED.get(id(qw)), _stored_state(qw)
    if cached is None or cached[0]() is not qw or any(old is not new for old, new in zip(cached[1], state)):
        cached = (weakref.ref(qw), state, _checked(_describe_affine(qw), qw))
        _DESCRIBED[id(qw)] = cached
        weakref.finalize(qw, _DESCRIBED.pop, id(qw), None)
    described = cached[2]
    if described is None:
        return None
    spec, keep = described
    if bias is not None:
        spec = LinearSpec.from_buffer_copy(spec)
        spec.bias = bias.data_ptr()
        keep = keep + [bias]
    return spec, keep


def _checked(described: tuple[LinearSpec, list[torch.Tensor]] | None, qw: QuantizedWeight
             ) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    """`described`, once csrc/checks.c agrees its buffers hold what its layout makes the kernels read (once per
    weight: every kernel call after it trusts the bytes and checks only its own arguments' sizes)."""
    lib = native_library()
    if described is not None and lib is not None:
        check_linear(lib, described[0], buffer_sizes(described[1]), type(qw.scheme).__name__)
    return described


def _stored_state(qw: QuantizedWeight) -> tuple[Any, ...]:
    """What identifies a weight's numbers: its stored codes (or the packed copy keep_kernel_layout left, or, codes
    derived on access, the bytes they come from), scales, zeros and column groups. A method replacing any of them
    (QAT's trained scales: training.qat) invalidates the C description, which holds copies of the statistics."""
    stored = qw.__dict__.get("_codes")
    if stored is None:
        stored = packed_codes(qw)
    codes = stored if stored is not None else qw.extra.get("blocks")
    return codes, qw.__dict__.get("_scales"), qw.__dict__.get("_zeros"), qw.g_idx


def column_order(qw: QuantizedWeight) -> torch.Tensor | None:
    """For an act-order weight (g_idx not k // group_size): the column order that makes its groups contiguous
    runs of group_size columns (int64 [K]); None when the groups already are contiguous. Raises ValueError when
    no order does (groups of unequal sizes)."""
    from lowbit.runtime.kernels import contiguous_groups

    if contiguous_groups(qw):
        return None
    order = torch.argsort(qw.g_idx.long(), stable=True)
    if not torch.equal(qw.g_idx.long()[order], torch.arange(qw.in_features) // qw.effective_group_size):
        raise ValueError("groups of unequal sizes")
    return order


def _describe_codebook(qw: QuantizedWeight) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    """A codebook scheme (Scheme.codebook_form: W = a * table[q]) as the LB_NIB layout with a table."""
    form = qw.scheme.codebook_form(qw)
    n, k = qw.shape
    if form is None or not nibble_layout_fits(4, k, qw.effective_group_size):
        return None
    table, a = form
    codes = packed_codes(qw)
    codes = pack_nibbles(qw.codes) if codes is None else codes
    stats, a, b, offset = compact_statistics(a, torch.zeros_like(a))
    table = table.float().contiguous()
    spec = LinearSpec(LB_NIB, n, k, a.shape[1], qw.effective_group_size, codes.data_ptr(), a.data_ptr(),
                      b.data_ptr(), None, stats, offset, None, table.data_ptr())
    return spec, [codes, a, b, table]


def ggml_block_spec(blocks: torch.Tensor, type_name: str, shape: tuple[int, int]
                    ) -> tuple[LinearSpec, list[torch.Tensor]]:
    """The C description of GGUF block bytes [N, row_bytes] of `type_name` (a key of GGML_KINDS) for a weight of
    `shape`, pointing at those bytes (no copy unless they are not contiguous). Raises LowbitError for a type the
    kernels do not read or bytes that do not hold the shape, before any C code sees them."""
    from lowbit.schemes.ggml import codec

    n, k = shape
    c = codec(type_name)
    if c.name not in GGML_KINDS:
        raise LowbitError(f"no compiled kernel reads GGUF {c.name} blocks; known: {', '.join(GGML_KINDS)}")
    if n < 1 or k < 1 or k % c.block:
        raise LowbitError(f"a [{n}, {k}] {c.name} weight needs a positive row width that is a multiple of {c.block}")
    if blocks.dtype != torch.uint8 or blocks.numel() != n * (k // c.block) * c.type_size:
        raise LowbitError(f"{blocks.numel()} {blocks.dtype} values cannot be the {c.name} blocks of a [{n}, {k}] "
                          f"weight ({n * (k // c.block) * c.type_size} bytes)")
    blocks = blocks.contiguous()
    spec = LinearSpec(GGML_KINDS[c.name], n, k, k // 32, c.block, blocks.data_ptr(), None, None, None)
    return spec, [blocks]


def reads_blocks(qw: QuantizedWeight) -> bool:
    """True when the compiled kernels read this weight's GGUF blocks directly (csrc/ggml_blocks.h)."""
    return native_library() is not None and _describe_blocks(qw) is not None


def _describe_blocks(qw: QuantizedWeight) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    """A GGUF weight whose block bytes are its state (no codes stored by a method since): those bytes, as the
    file stores them. None for anything else."""
    if not getattr(qw.scheme, "derives_codes", False) or qw.__dict__.get("_codes") is not None:
        return None
    blocks, type_name = qw.extra.get("blocks"), getattr(qw.scheme, "type", None)
    if not isinstance(blocks, torch.Tensor) or type_name not in GGML_KINDS:
        return None
    return ggml_block_spec(blocks, type_name, qw.shape)


def _describe_affine(qw: QuantizedWeight) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    blocks = _describe_blocks(qw)
    if blocks is not None:
        return blocks
    if qw.scheme.quantizes_activations:
        return None      # LLM.int8 / dynamic int8: float activations would change their numbers
    form = qw.scheme.affine_form(qw)
    if form is None:
        return _describe_codebook(qw)
    if form[2] > 8:
        return None
    try:
        order = column_order(qw)
    except ValueError:
        return None
    a, b, bits = form
    n, k = qw.shape
    group = qw.effective_group_size
    if nibble_layout_fits(bits, k, group):
        # keep_kernel_layout may have made these bytes (in this order) the codes' only copy
        packed = packed_codes(qw)
        kind, codes = LB_NIB, packed if packed is not None else pack_nibbles(
            qw.codes if order is None else qw.codes[:, order])
    else:
        kind, codes = LB_U8, (qw.codes if order is None else qw.codes[:, order]).to(torch.uint8).contiguous()
    stats, a, b, offset = compact_statistics(a.float(), b.float())
    perm = None if order is None else order.to(torch.int32).contiguous()
    spec = LinearSpec(kind, n, k, a.shape[1], group, codes.data_ptr(), a.data_ptr(), b.data_ptr(), None, stats,
                      offset, None if perm is None else perm.data_ptr())
    return spec, [codes, a, b] + ([perm] if perm is not None else [])


def compact_statistics(a: torch.Tensor, b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """The smallest exact storage of the group statistics: (LB_STATS_*, a, b, offset): a alone when
    b = offset * a for one offset, float16 when the values survive it unchanged (the kernels read fewer bytes)."""
    a = a.contiguous()
    a16 = a.half()
    half_a = torch.equal(a16.float(), a)
    nonzero = a != 0
    if bool(nonzero.any()):
        offset = float((b[nonzero] / a[nonzero]).flatten()[0])
        if torch.equal(b, a * offset):
            return (LB_STATS_F16_OFFSET, a16, a16, offset) if half_a else (LB_STATS_F32_OFFSET, a, a, offset)
    b16 = b.half()
    if half_a and torch.equal(b16.float(), b):
        return LB_STATS_F16, a16, b16.contiguous(), 0.0
    return LB_STATS_F32, a, b.contiguous(), 0.0


def linear_spec(module: Any, stored_order: bool = False) -> tuple[LinearSpec, list[torch.Tensor]] | None:
    """`affine_spec` for a QuantLinear (with its bias), or a description of a float Linear's weight in its own
    dtype (float32, float16 or bfloat16: LB_F32 / LB_F16 / LB_BF16, read where it lies; other dtypes as a float32
    copy); None if the module is neither (or its weight is not affine).

    A QuantLinear with an output order (its outputs are its stored rows' in another order) is described only
    with `stored_order`, by a caller that puts the outputs in order itself: its rows as stored, and its bias
    moved to the stored rows; without, None (C would compute the outputs out of order)."""
    from lowbit.runtime.qlinear import QuantLinear

    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float().contiguous()
    if isinstance(module, QuantLinear):
        order = module.output_order
        if order is not None and not stored_order:
            return None
        if order is not None and bias is not None:     # output j is stored row order[j]: its bias goes there
            bias = torch.empty_like(bias).index_copy_(0, order, bias)
        return affine_spec(module.qweight, bias)
    weight = getattr(module, "weight", None)
    if (not isinstance(module, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2
            or not weight.is_floating_point() or type(module).__name__ not in ("Linear", "_DenseLinear", "HalfWeightLinear")):
        return None
    weight = weight.detach()
    if weight.dtype not in FLOAT_KINDS:
        weight = weight.float()
    weight = weight.contiguous()
    n, k = weight.shape
    keep = [weight] + ([bias] if bias is not None else [])
    return LinearSpec(FLOAT_KINDS[weight.dtype], n, k, 0, 0, weight.data_ptr(), None, None,
                      bias.data_ptr() if bias is not None else None), keep


def linear(spec: LinearSpec, x: torch.Tensor, act8: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] W^T (+ bias) with the compiled kernel on torch's thread count: float32 arithmetic, or
    with `act8` int8 activations (llama.cpp's Q8_0 / Q8_K arithmetic) where the layout allows."""
    lib = lib or native_library()
    if x.dim() != 2 or x.shape[1] != spec.k:
        # C reads M x K floats from x's pointer, however many it holds: a narrower input is read past its end
        raise LowbitError(f"a {spec.n} x {spec.k} quantized layer was given inputs of shape {list(x.shape)}; it "
                          f"needs [rows, {spec.k}]")
    x = x.float().contiguous()
    threads = torch.get_num_threads()
    y = torch.empty(x.shape[0], spec.n, dtype=torch.float32)
    scratch = torch.empty(max(1, scratch_floats(lib, spec, x.shape[0], threads)), dtype=torch.float32)
    activations = Activations.INT8 if act8 else Activations.FLOAT32
    check_status(lib.lowbit_linear(ctypes.byref(spec), x.data_ptr(), x.numel(), x.shape[0], y.data_ptr(), y.numel(),
                                   scratch.data_ptr(), scratch.numel(), activations.code, threads),
                 f"a {spec.n} x {spec.k} compiled matmul", lib)
    return y


def scratch_floats(lib: ctypes.CDLL, spec: LinearSpec, rows: int, threads: int) -> int:
    """Floats of scratch lowbit_linear needs for `rows` rows on `threads` threads."""
    floats = ctypes.c_int64()
    check_status(lib.lowbit_linear_scratch(ctypes.byref(spec), rows, threads, ctypes.byref(floats)),
                 f"a {spec.n} x {spec.k} compiled matmul", lib)
    return floats.value


def uses_act8(spec: LinearSpec, activations: Activations, lib: ctypes.CDLL | None = None) -> bool:
    """True when the kernels round this weight's activations to int8 under `activations`."""
    lib = lib or native_library()
    return bool(lib is not None and lib.lowbit_uses_act8(ctypes.byref(spec), activations.code))


def has_act8() -> bool:
    """True when the compiled library has the int8-activation kernels (AVX-512 VNNI or AVX2)."""
    lib = native_library()
    return bool(lib is not None and lib.lowbit_has_act8())


def sample_rows_native(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor | None:
    """Token ids [B] drawn from softmax(logits [B, V] / temperature) with uniforms [B] (float64 in [0, 1)) by the
    compiled sampler (decode.c's lowbit_sample_rows: the inverse CDF generate.draw computes, in three vectorised
    passes over each row instead of torch's five); None without the compiled library, for logits it does not read
    (not float32 rows on the CPU), a temperature below float32's smallest normal, or when a row has no finite
    largest logit (the caller's torch path decides)."""
    lib = native_library()
    if lib is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        return None
    if temperature < torch.finfo(torch.float32).tiny:   # 1 / temperature would overflow float32 in C
        return None
    logits = logits.contiguous()
    uniforms = uniforms.to(torch.float64).contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    check_status(lib.lowbit_sample_rows(logits.data_ptr(), logits.numel(), logits.shape[0], logits.shape[1],
                                        float(temperature), uniforms.data_ptr(), uniforms.numel(),
                                        tokens.data_ptr(), tokens.numel(), torch.get_num_threads()),
                 "compiled sampler", lib)
    return None if bool((tokens < 0).any()) else tokens

