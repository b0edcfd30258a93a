"""Many-row matmuls (continuous batching's step multiplies every weight by all running rows at once): the kernels'
results for M rows are bit for bit the results of M one-row calls, on every layout whose many-row path differs
(csrc/affine_dot.h: lowbit's integer codes and codebooks with float32 activations widen a block's codes once from
LB_GEMM_ROWS rows; csrc/ggml_blocks.h: GGUF blocks with int8 activations), for ragged row counts and widths that
are not multiples of 256, on this machine's build and the portable one; and a whole decode step of many rows
equals its rows decoded one at a time."""
from __future__ import annotations

import pytest
import torch

from lowbit.runtime import clib
from lowbit.runtime.clib import LB_NIB, LB_U8, LinearSpec, compact_statistics, pack_nibbles

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

ROW_COUNTS = [1, 15, 16, 17, 33]
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])


def _affine_spec(kind: int, n: int, k: int, group: int, bits: int, seed: int, table: bool = False,
                 act_order: bool = False):
    """(spec, tensors to keep alive, dense float weight) of random codes affine per group (or a codebook)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    a = (torch.rand(n, groups, generator=gen) * 0.1 + 0.01).half().float()
    b = torch.zeros_like(a) if table else (torch.randn(n, groups, generator=gen) * 0.3).half().float()
    storage, a2, b2, offset = compact_statistics(a, b)
    w = pack_nibbles(codes) if kind == LB_NIB else codes.contiguous()
    values = NF4[codes.long()] if table else codes.float()
    expand = lambda t: t.repeat_interleave(group, 1)[:, :k]  # noqa: E731
    dense = values * expand(a) + expand(b)
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    if perm is not None:       # column j of the stored weight multiplies x[:, perm[j]]
        logical = torch.empty_like(dense)
        logical[:, perm.long()] = dense
        dense = logical
    keep = [w, a2, b2, NF4] + ([perm] if perm is not None else [])
    spec = LinearSpec(kind, n, k, groups, group, w.data_ptr(), a2.data_ptr(), b2.data_ptr(), None, storage, offset,
                      None if perm is None else perm.data_ptr(), NF4.data_ptr() if table else None)
    return spec, keep, dense


def _float_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.shape[1] * 2 ** -23 * (x.abs() @ w.abs().T) + 1e-5


def _rows_one_by_one(spec, x, lib=None, act8=False) -> torch.Tensor:
    return torch.cat([clib.linear(spec, x[r:r + 1], act8=act8, lib=lib) for r in range(x.shape[0])])


GGML_CASES = [("Q4_0", 37, 576), ("Q4_1", 20, 96), ("Q5_0", 9, 160), ("Q5_1", 16, 64), ("Q8_0", 33, 576),
              ("Q4_K", 12, 512), ("Q6_K", 8, 256)]
AFFINE_CASES = [  # (kind, n, k, group, bits, table, act_order)
    (LB_NIB, 37, 576, 128, 4, False, False),     # SmolLM2's width, 37 rows: a block of fewer than 4 at the end
    (LB_NIB, 40, 96, 64, 4, False, False),       # ragged last group
    (LB_NIB, 20, 192, 32, 4, True, False),       # NF4 codebook
    (LB_NIB, 24, 160, 32, 4, False, True),       # act-order columns
    (LB_NIB, 24, 256, 16, 3, False, False),      # groups of 16: the per-row tiles at any M
    (LB_U8, 33, 200, 200, 8, False, False),      # one code per byte, width with a 8-column tail
    (LB_U8, 12, 96, 48, 6, False, False),        # groups that end mid-32-column step
]


@pytest.mark.parametrize("kind,n,k,group,bits,table,act_order", AFFINE_CASES)
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_many_rows_equal_rows_one_by_one(kind, n, k, group, bits, table, act_order, rows):
    spec, keep, dense = _affine_spec(kind, n, k, group, bits, seed=rows, table=table, act_order=act_order)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    many = clib.linear(spec, x)
    assert torch.equal(many, _rows_one_by_one(spec, x))
    assert ((many.double() - x.double() @ dense.double().T).abs() <= _float_bound(x, dense).double()).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_are_the_same_on_any_thread_count(threads):
    spec, keep, dense = _affine_spec(LB_NIB, 61, 320, 64, 4, seed=3)
    x = torch.randn(17, 320)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        many = clib.linear(spec, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(many, _rows_one_by_one(spec, x))


@pytest.mark.parametrize("flags", [None, ["-mavx2", "-mfma", "-mf16c"]], ids=["portable", "avx2"])
def test_fallback_builds_many_rows_equal_rows_one_by_one(tmp_path, flags):
    """The builds without AVX-512 (plain loops; AVX2 tiles) have no many-row paths: each row gets the same numbers
    whether it comes alone or with 16 others, within float32 rounding of the dense matmul, for lowbit's layouts
    (float32 activations) and GGUF blocks (int8 activations)."""
    import shutil
    import subprocess

    import numpy as np

    from lowbit.schemes.ggml import quantize_rows

    target = tmp_path / "fallback.so"
    if flags is None:
        result = clib.compile_library(target, march_native=False)
    else:
        if shutil.which("gcc") is None:
            pytest.skip("gcc is not installed")
        result = subprocess.run(["gcc", "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(target),
                                 *map(str, clib.SOURCES), "-lm"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lib = clib.load_library(target)
    assert lib.lowbit_kernel_has_avx512() == 0
    for kind, n, k, group, bits, table, act_order in AFFINE_CASES:
        spec, keep, dense = _affine_spec(kind, n, k, group, bits, seed=1, table=table, act_order=act_order)
        x = torch.randn(17, k)
        many = clib.linear(spec, x, lib=lib)
        assert torch.equal(many, _rows_one_by_one(spec, x, lib=lib)), (kind, k, group)
        assert ((many - x @ dense.T).abs() <= _float_bound(x, dense)).all(), (kind, k, group)
    for type_name, n, k in GGML_CASES:
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
        spec, keep = clib.ggml_block_spec(torch.from_numpy(quantize_rows(w, type_name)), type_name, (n, k))
        x = torch.randn(17, k)
        assert torch.equal(clib.linear(spec, x, act8=True, lib=lib), _rows_one_by_one(spec, x, lib=lib, act8=True))


def test_inverse_cdf_draws_follow_the_probabilities():
    """draw() picks token i for uniforms in [cdf[i - 1], cdf[i]): never a token of probability 0, the last nonzero
    one for a uniform that rounds to the total, and frequencies close to the probabilities."""
    from lowbit.engine.generate import draw

    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    assert draw(probs, torch.tensor([0.0])).tolist() == [1]
    assert draw(probs, torch.tensor([0.2499])).tolist() == [1]
    assert draw(probs, torch.tensor([0.25])).tolist() == [3]
    assert draw(probs, torch.tensor([1.0])).tolist() == [3]      # at the total: the last nonzero token
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = torch.bincount(draw(probs.expand(20000, 5), uniforms), minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0 and abs(counts[3].item() / 20000 - 0.75) < 0.02


@pytest.fixture
def without_tiles():
    """The AMX tile path switched off for the test (the vector kernels' bit-for-bit promises), then restored."""
    lib = clib.native_library()
    was = lib.lowbit_amx(-1)
    lib.lowbit_amx(0)
    yield
    lib.lowbit_amx(1 if was else 0)


@pytest.mark.parametrize("type_name,n,k", GGML_CASES)
@pytest.mark.parametrize("rows", ROW_COUNTS)
@pytest.mark.parametrize("act8", [True, False])
def test_gguf_many_rows_equal_rows_one_by_one(type_name, n, k, rows, act8, without_tiles):
    """GGUF blocks (int8 activations: the packed many-row kernel from 8 rows of the 32-value types; float32: the
    per-row kernels) give each row of a batch the numbers it gets alone (the vector kernels; the tile path below
    is bounded instead)."""
    import numpy as np

    from lowbit.schemes.ggml import quantize_rows

    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    spec, keep = clib.ggml_block_spec(torch.from_numpy(quantize_rows(w, type_name)), type_name, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1)) * torch.linspace(0.1, 3.0, k)
    many = clib.linear(spec, x, act8=act8)
    assert torch.equal(many, _rows_one_by_one(spec, x, act8=act8))


@pytest.mark.parametrize("config", [dict(method="rtn", bits=4, group_size=32), dict(method="nf4")],
                         ids=["rtn4-g32", "nf4"])
def test_decode_step_of_many_rows_equals_rows_one_at_a_time(config):
    """The compiled step over 17 sequences (cache slots at different positions) gives every row the logits it gets
    decoded alone: the many-row matmuls change nothing, and attention is per row."""
    import copy

    from conftest import tiny_llama

    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    model = copy.deepcopy(tiny_llama(hidden=128, intermediate=192, layers=2, vocab=96))
    quantize_model(model, QuantizeConfig(skip=(), **config), progress=False)
    engine = Engine(model, max_batch=17, context=48, activations="float32")
    step = engine.decoder.native
    seqs = [engine.start([1 + b % 90, 2 + b, 3][: 1 + b % 3], SamplingParams(max_new_tokens=30), stop_on_eos=False)
            for b in range(17)]
    for _ in range(3):
        engine.step()
    tokens = torch.tensor([s.generated[-1] for s in seqs])
    slots = torch.tensor([s.slot for s in seqs])
    positions = torch.tensor([s.position for s in seqs])
    alone = torch.cat([step(tokens[b:b + 1], slots[b:b + 1], positions[b:b + 1]) for b in range(17)])
    together = step(tokens, slots, positions)     # rewrites the same cache entries with the same values
    assert torch.equal(together, alone)


AMX_CASES = [("Q4_K", 35, 768), ("Q5_K", 16, 512), ("Q6_K", 37, 256), ("Q4_K", 48, 2048), ("Q6_K", 32, 1024),
             ("Q4_0", 37, 576), ("Q4_1", 20, 96), ("Q5_0", 9, 160), ("Q5_0", 25, 160), ("Q5_1", 16, 64),
             ("Q8_0", 33, 896)]


@pytest.mark.skipif(clib.native_library() is None or not clib.native_library().lowbit_amx(-1),
                    reason="no AMX tile unit (or not granted): the tile path is not compiled in or not used")
@pytest.mark.parametrize("type_name,n,k", AMX_CASES)
@pytest.mark.parametrize("rows", [16, 17, 40, 150])
def test_amx_tiles_equal_rows_one_by_one_within_float_rounding(type_name, n, k, rows):
    """From 16 rows (K-quants; 32 for the 32-value types), GGUF weights with int8 activations run through AMX
    tiles (16 weight rows x 16 activation rows per tile; rows past the last 16 of the weight, the per-row kernel).
    Both paths compute the same exact integers per block (scaled dot products; the offset term exactly for
    K-quants, through the float sums sx for the 32-value types as the per-row kernel does), and differ only in
    float rounding: each result is a sum of at most 16 products per block and a few terms per block, with
    relative rounding 2^-24 per operation, so |tiles - vector| <= 2 (blocks + 24) 2^-24 T, where T bounds the sum
    of the terms' magnitudes: B max|x8 dx| max(|d scale q| + |offset|) per block of B columns <= 3 B max|x|
    max|w| (the codes' term spans the block's range of w, the offset its minimum or half range). 150 rows cover a
    second pass of 8 activation groups."""
    import numpy as np

    from lowbit.schemes.ggml import dequantize_rows, quantize_rows

    rng = np.random.default_rng(rows + k)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    blocks = quantize_rows(w, type_name)
    spec, keep = clib.ggml_block_spec(torch.from_numpy(blocks), type_name, (n, k))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1)) * torch.linspace(0.1, 3.0, k)
    tiles = clib.linear(spec, x, act8=True)
    vector = _rows_one_by_one(spec, x, act8=True)
    dequantized = torch.from_numpy(dequantize_rows(blocks, type_name).reshape(n, k)).double()
    block = 256 if type_name.endswith("_K") else 32
    x_max = x.double().abs().view(rows, k // block, block).amax(-1)
    w_max = dequantized.abs().view(n, k // block, block).amax(-1)
    bound = 2 * (k // block + 24) * 2.0 ** -24 * 3 * block * (x_max @ w_max.T)
    # the tiles ran (their float rounding is not the vector kernels'): from 16 weight rows and the row count above
    tiled = n >= 16 and rows >= (16 if block == 256 else 32)
    assert torch.equal(tiles, vector) != tiled, "the tile path ran" if not tiled else "the tile path did not run"
    difference = (tiles.double() - vector.double()).abs()
    assert (difference <= bound).all(), float((difference / bound).max())
    # and the tiles' result is the weight's: within the int8 rounding of the activations (1/254 of each block's max)
    exact = x.double() @ dequantized.T
    assert ((tiles.double() - exact).abs() <= block * (x_max / 254) @ w_max.T + 1e-4).all()
