"""Every exported entry point of the kernel library (csrc/) checks the sizes of the buffers it is given: called
through ctypes with one buffer one value too small, an index out of its range or an invalid argument, it returns
that problem's status (csrc/checks.h) and writes nothing, not even into canary values placed right after the real
buffers; with the right sizes it still computes the reference numbers (torch).

tests/test_asan.py runs this file against an AddressSanitizer build with LOWBIT_TEST_EXACT_BUFFERS=1: no canaries
then, every buffer is exactly the size passed, so a write past one is ASan's report instead of a canary check.
"""
from __future__ import annotations

import ctypes
import os

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.runtime import checks, clib

from conftest import tiny_llama

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

SPARE = 0 if os.environ.get("LOWBIT_TEST_EXACT_BUFFERS") else 64   # canary values after each buffer
CANARY = 1234.5
THREADS = 2
# csrc/checks.h
OK, DIMS, INPUT, OUTPUT, SCRATCH, ROWS, SLOT, POSITION, CACHE, ARGUMENT = 0, 2, 10, 11, 12, 13, 14, 15, 16, 17
MODEL_FLAGS, MODEL_DIMS, MODEL_SHAPE, MODEL_MISSING, MODEL_UNSUPPORTED = 18, 19, 20, 21, 22


def _lib() -> ctypes.CDLL:
    return clib.native_library()


def _buffer(values: int, fill: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`values` values (the first of `fill`, else canaries) followed by SPARE canaries."""
    buffer = torch.full((max(values, 0) + SPARE,), CANARY, dtype=dtype)
    if fill is not None:
        buffer[:values] = fill.flatten()[:values]
    return buffer


def _untouched(buffer: torch.Tensor, start: int = 0) -> bool:
    return bool((buffer[start:] == CANARY).all())


FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _weight(layout: str) -> tuple[clib.LinearSpec, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(C description, tensors it points into, float weight and bias it stands for) of a 48 x 256 weight of
    `layout` (a float one, float32 / float16 / bfloat16, with a bias)."""
    from lowbit.schemes.ggml import GGMLScheme, quantize_rows
    from lowbit.schemes.intgrid import IntGrid

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    if layout in FLOAT_DTYPES:            # read in its own dtype: the reference is the same values in float32
        linear = torch.nn.Linear(256, 48, bias=True)
        linear.weight.data, linear.bias.data = w.to(FLOAT_DTYPES[layout]), torch.randn(48)
        spec, keep = clib.linear_spec(linear)
        return spec, keep, linear.weight.detach().float(), linear.bias.detach()
    if layout == "q4_k":
        qw = GGMLScheme("Q4_K").from_blocks(quantize_rows(w.numpy(), "Q4_K"), (48, 256))
    else:
        qw = IntGrid(bits={"nib": 4, "u8": 8}[layout], group_size=32).quantize(w)
    spec, keep = clib.affine_spec(qw)
    return spec, keep + [qw], qw.dequantize(), torch.zeros(48)


LAYOUTS = ["f32", "f16", "bf16", "nib", "u8", "q4_k"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_refuses_short_buffers_and_computes_with_right_ones(layout):
    spec, keep, dense, bias = _weight(layout)
    lib, rows = _lib(), 3
    x = torch.randn(rows, spec.k, generator=torch.Generator().manual_seed(1))
    reference = x.double() @ dense.double().T + bias.double()
    bound = spec.k * 2 ** -23 * (x.abs() @ dense.abs().T).double() + 1e-5
    sizes = {"x": rows * spec.k, "y": rows * spec.n, "scratch": clib.scratch_floats(lib, spec, rows, THREADS)}
    for short, expected in ((None, OK), ("x", INPUT), ("y", OUTPUT), ("scratch", SCRATCH)):
        given = {name: size - (name == short) for name, size in sizes.items()}
        xb, y, scratch = _buffer(given["x"], x), _buffer(given["y"]), _buffer(given["scratch"])
        before = xb.clone()
        status = lib.lowbit_linear(ctypes.byref(spec), xb.data_ptr(), given["x"], rows, y.data_ptr(), given["y"],
                                   scratch.data_ptr(), given["scratch"], 0, THREADS)
        assert status == expected, (layout, short)
        assert torch.equal(xb, before)
        assert _untouched(y, 0 if short else sizes["y"]) and _untouched(scratch, given["scratch"]), (layout, short)
        if short is None:
            assert ((y[:sizes["y"]].view(rows, spec.n).double() - reference).abs() <= bound).all(), layout
    y, scratch = _buffer(sizes["y"]), _buffer(sizes["scratch"])
    xb = _buffer(sizes["x"], x)
    for bad in ({"M": -1}, {"threads": 0}, {"threads": 5000}, {"activations": 3}):
        call = {"M": rows, "threads": THREADS, "activations": 0, **bad}
        status = lib.lowbit_linear(ctypes.byref(spec), xb.data_ptr(), sizes["x"], call["M"], y.data_ptr(),
                                   sizes["y"], scratch.data_ptr(), sizes["scratch"], call["activations"],
                                   call["threads"])
        assert status == ARGUMENT and _untouched(y) and _untouched(scratch), bad
    bent = clib.LinearSpec.from_buffer_copy(spec)
    bent.n = 0                                   # a description whose fields the kernels cannot index with
    assert lib.lowbit_linear(ctypes.byref(bent), xb.data_ptr(), sizes["x"], rows, y.data_ptr(), sizes["y"],
                             scratch.data_ptr(), sizes["scratch"], 0, THREADS) == DIMS
    assert _untouched(y)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [-1, 257, 1 << 62])
def test_scratch_refuses_group_counts_outside_the_columns(layout, groups):
    """Every layout's `groups` is bounded by its columns, float and GGUF blocks too (which do not read it):
    lowbit_linear_scratch sizes scratch with it, so a count past k would overflow that product instead."""
    spec, keep, _, _ = _weight(layout)
    bent = clib.LinearSpec.from_buffer_copy(spec)
    bent.groups = groups
    floats = ctypes.c_int64(-7)
    assert _lib().lowbit_linear_scratch(ctypes.byref(bent), 3, THREADS, ctypes.byref(floats)) == DIMS
    assert floats.value == -7
    assert _lib().lowbit_linear_scratch(ctypes.byref(spec), 3, THREADS, ctypes.byref(floats)) == OK


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bf16", [0, 1])
def test_dequantize_rows_refuses_ranges_and_short_outputs(layout, bf16):
    spec, keep, dense, _ = _weight(layout)
    lib, n, k = _lib(), spec.n, spec.k
    dtype = torch.bfloat16 if bf16 else torch.float32
    width = 2 if bf16 else 4
    for n0, n1, short, expected in ((0, n, 0, OK), (5, 17, 0, OK), (7, 7, 0, OK), (17, 5, 0, ROWS),
                                    (-1, 3, 0, ROWS), (0, n + 1, 0, ROWS), (5, 17, 1, OUTPUT)):
        need = max(n1 - n0, 0) * k * width
        given = need - short
        out = torch.full((max(given, 0) + SPARE * 4,), 0xA5, dtype=torch.uint8)    # bytes: canaries of 0xA5
        status = lib.lowbit_dequantize_rows(ctypes.byref(spec), n0, n1, out.data_ptr(), given, bf16, THREADS)
        assert status == expected, (n0, n1, short)
        written = need if expected == OK else 0
        assert bool((out[written:] == 0xA5).all()), (n0, n1, short)
        if expected == OK and need:
            rows = out[:need].view(dtype).view(n1 - n0, k).float()
            assert torch.allclose(rows, dense[n0:n1].to(dtype).float(), rtol=1e-2 if bf16 else 1e-6, atol=1e-6)
    out = torch.full((n * k * 4 + SPARE * 4,), 0xA5, dtype=torch.uint8)
    for bf16_flag, threads in ((2, THREADS), (bf16, 0)):
        assert lib.lowbit_dequantize_rows(ctypes.byref(spec), 0, n, out.data_ptr(), n * k * 4, bf16_flag,
                                          threads) == ARGUMENT
    assert bool((out == 0xA5).all())


@pytest.fixture(scope="module")
def step():
    """A float tiny Llama's compiled step, with its model and decoder (KV caches of 2 slots x 16 positions)."""
    from lowbit.engine.runner import Engine

    model = tiny_llama(hidden=64, intermediate=128, layers=2, vocab=96, seed=5)
    decoder = Engine(model, context=16, max_batch=2).decoder
    assert decoder.native is not None
    return model, decoder, decoder.native


def _decode(native, tokens, slots, positions, logit_rows=None, short=None, threads=1, rows=None, logit_count=None):
    """lowbit_decode_step through ctypes with canaried buffers; `short` names the size reported one too small;
    `logit_rows`: the rows whose logits are asked for (None: all), `logit_count` the count C is told (default:
    their number). (status, x buffer before, x buffer after, logits buffer, workspace buffer)."""
    lib, spec = native.lib, native.spec
    batch = len(tokens) if rows is None else rows
    work = ctypes.c_int64()
    status = lib.lowbit_decode_workspace(ctypes.byref(spec), max(batch, 0), max(threads, 1), ctypes.byref(work))
    assert status == OK
    embedded = native.embed(torch.tensor(tokens, dtype=torch.long)).float()
    out_rows = len(logit_rows) if logit_rows is not None else max(batch, 0)
    wanted = torch.tensor(logit_rows if logit_rows is not None else [], dtype=torch.int64)
    sizes = {"x": embedded.numel(), "slots": len(slots), "positions": len(positions),
             "logits": out_rows * native.vocab, "work": work.value, "k_cache": native.caches[0].numel(),
             "v_cache": native.caches[1].numel()}
    given = {name: size - (name == short) for name, size in sizes.items()}
    x, logits, workspace = _buffer(given["x"], embedded), _buffer(given["logits"]), _buffer(given["work"])
    slot_values = torch.tensor(slots, dtype=torch.int64)[:given["slots"]].contiguous()
    position_values = torch.tensor(positions, dtype=torch.int64)[:given["positions"]].contiguous()
    before = x.clone()
    status = lib.lowbit_decode_step(
        ctypes.byref(spec), x.data_ptr(), given["x"], batch, slot_values.data_ptr(), given["slots"],
        position_values.data_ptr(), given["positions"], logits.data_ptr(), given["logits"], workspace.data_ptr(),
        given["work"], given["k_cache"], given["v_cache"], threads,
        wanted.data_ptr() if logit_rows is not None else None,
        (len(logit_rows) if logit_count is None else logit_count) if logit_rows is not None else 0)
    return status, before, x, logits, workspace, sizes


@pytest.mark.parametrize("short,expected", [("x", INPUT), ("logits", OUTPUT), ("work", SCRATCH), ("k_cache", CACHE),
                                            ("v_cache", CACHE), ("slots", SLOT), ("positions", POSITION)])
def test_decode_step_refuses_a_buffer_one_too_small(step, short, expected):
    model, decoder, native = step
    caches = [c.clone() for c in native.caches]
    status, before, x, logits, workspace, _ = _decode(native, [5, 7], [0, 1], [0, 0], short=short)
    assert status == expected
    assert torch.equal(x, before) and _untouched(logits) and _untouched(workspace)
    assert all(torch.equal(c, old) for c, old in zip(native.caches, caches))


@pytest.mark.parametrize("slots,positions,expected", [([0, 2], [0, 0], SLOT), ([-1, 0], [0, 0], SLOT),
                                                      ([0, 1], [0, 16], POSITION), ([0, 1], [-1, 0], POSITION)])
def test_decode_step_refuses_slots_and_positions_outside_the_cache(step, slots, positions, expected):
    model, decoder, native = step
    caches = [c.clone() for c in native.caches]
    status, before, x, logits, workspace, _ = _decode(native, [5, 7], slots, positions)
    assert status == expected
    assert torch.equal(x, before) and _untouched(logits) and _untouched(workspace)
    assert all(torch.equal(c, old) for c, old in zip(native.caches, caches))


def test_decode_step_refuses_invalid_arguments(step):
    model, decoder, native = step
    for tokens, kwargs in (([5], {"threads": 0}), ([], {"logit_rows": [0]}), ([5], {"logit_rows": [1]}),
                           ([5], {"logit_rows": [-1]}), ([5, 7], {"logit_rows": [0], "logit_count": 0}),
                           ([5, 7], {"logit_rows": [0, 1, 1], "logit_count": 3}), ([5], {"rows": -1})):
        status, before, x, logits, workspace, _ = _decode(native, tokens, [0] * len(tokens), [0] * len(tokens),
                                                          **kwargs)
        assert status == ARGUMENT, kwargs
        assert torch.equal(x, before) and _untouched(logits) and _untouched(workspace)


def test_decode_step_with_right_sizes_matches_transformers(step):
    """Two rows in two slots at position 0, and the last row only of a 3-token prompt chunk: the logits equal
    transformers' forward of the same tokens; nothing is written past any buffer."""
    model, decoder, native = step
    status, _, x, logits, workspace, sizes = _decode(native, [5, 7], [0, 1], [0, 0], threads=THREADS)
    assert status == OK
    with torch.no_grad():
        reference = torch.stack([model(torch.tensor([[t]])).logits[0, -1] for t in (5, 7)])
    got = logits[:sizes["logits"]].view(2, native.vocab)
    assert (got - reference).abs().max() <= 1e-4 * (reference.max() - reference.min())
    assert _untouched(logits, sizes["logits"]) and _untouched(workspace, sizes["work"])
    assert _untouched(x, sizes["x"])
    status, _, x, logits, workspace, sizes = _decode(native, [3, 9, 4], [1, 1, 1], [0, 1, 2], logit_rows=[2])
    assert status == OK
    with torch.no_grad():
        reference = model(torch.tensor([[3, 9, 4]])).logits[0, -1]
    got = logits[:native.vocab]
    assert (got - reference).abs().max() <= 1e-4 * (reference.max() - reference.min())
    assert _untouched(logits, native.vocab) and _untouched(workspace, sizes["work"])
    # two prompts in one step (slot 0: 3 tokens, slot 1: 2 tokens), the logits of each one's last row, in the
    # order asked: each equals transformers' forward of that prompt alone
    status, _, x, logits, workspace, sizes = _decode(native, [3, 9, 4, 8, 2], [0, 0, 0, 1, 1], [0, 1, 2, 0, 1],
                                                     logit_rows=[4, 2])
    assert status == OK
    for row, prompt in enumerate(([8, 2], [3, 9, 4])):
        with torch.no_grad():
            reference = model(torch.tensor([prompt])).logits[0, -1]
        got = logits[row * native.vocab:(row + 1) * native.vocab]
        assert (got - reference).abs().max() <= 1e-4 * (reference.max() - reference.min()), prompt
    assert _untouched(logits, 2 * native.vocab)


def _bend(edits):
    """Apply (structure, field, value) edits; the old values, to restore."""
    old = [(target, field, getattr(target, field)) for target, field, _ in edits]
    for target, field, value in edits:
        setattr(target, field, value)
    return old


# (edits of a step's structures, the status lowbit_check_model gives them, words of its detail)
MODEL_EDITS = [
    (lambda s: [(s, "activation", 9)], MODEL_FLAGS, "activation 9"),
    (lambda s: [(s, "gated", 2)], MODEL_FLAGS, "gated 2"),
    (lambda s: [(s, "kv_heads", 3)], MODEL_DIMS, "kv heads 3"),
    (lambda s: [(s, "context", 1 << 30)], MODEL_DIMS, "context 1073741824"),
    (lambda s: [(s, "rope_dim", 15)], MODEL_DIMS, "rotary 15"),
    (lambda s: [(s.layers[1].o, "n", 65536)], MODEL_SHAPE, "layer 1 o gives 65536 outputs"),
    (lambda s: [(s.layers[0].qkv[0], "k", 128)], MODEL_SHAPE, "layer 0 q|k|v part 0 reads 128 inputs"),
    (lambda s: [(s.layers[0].down, "k", 64)], MODEL_SHAPE, "layer 0 down part 0 reads 64 inputs"),
    (lambda s: [(s.lm_head, "k", 32)], MODEL_SHAPE, "lm_head part 0 reads 32 inputs"),
    (lambda s: [(s.layers[0].gate_up[0], "kind", 7)], 1, "layer 0 gate|up part 0"),
    (lambda s: [(s.layers[1], "input_norm", None)], MODEL_MISSING, "layer 1 has no input or MLP norm"),
    (lambda s: [(s.layers[0], "cos", None)], MODEL_MISSING, "layer 0 has no rotary tables"),
    (lambda s: [(s, "k_cache", None)], MODEL_MISSING, "no layers, final norm or KV caches"),
    (lambda s: [(s.layers[0], "input_norm_bias", s.layers[0].input_norm)], MODEL_UNSUPPORTED, "biases on RMSNorms"),
    (lambda s: [(s, "parallel", 1), (s.layers[0], "attn_out_norm", s.layers[0].input_norm)], MODEL_UNSUPPORTED,
     "sandwich norms in a parallel block"),
]


@pytest.mark.parametrize("edit,expected,words", MODEL_EDITS, ids=[words for _, _, words in MODEL_EDITS])
def test_check_model_refuses_what_the_step_cannot_run(step, edit, expected, words):
    model, decoder, native = step
    _assert_refused(decoder, native, edit, expected, words)


@pytest.fixture(scope="module")
def moe_step():
    """Qwen2-MoE (routed experts and a shared one, RTN 4-bit) in the compiled step."""
    from lowbit.engine.runner import Engine
    from test_compiled_families import family_model

    decoder = Engine(family_model("qwen2_moe"), context=16).decoder
    assert decoder.native is not None and decoder.native.spec.layers[0].moe
    return decoder, decoder.native


def _moe(spec):
    return spec.layers[0].moe.contents


MOE_EDITS = [
    (lambda s: [(_moe(s), "shared", 2)], MODEL_FLAGS, "shared 2"),
    (lambda s: [(_moe(s), "top_k", _moe(s).n_experts + 1)], MODEL_DIMS, "top_k"),
    (lambda s: [(_moe(s).router[0], "n", _moe(s).n_experts + 1)], MODEL_SHAPE, "layer 0 router gives"),
    (lambda s: [(_moe(s).experts[2], "k", _moe(s).experts[0].n - 32)], MODEL_SHAPE,
     "layer 0 expert 0 down part 0 reads"),
    (lambda s: [(_moe(s).experts[4], "n", 7)], MODEL_SHAPE, "layer 0 expert 1 up gives 7 outputs"),
    (lambda s: [(_moe(s).experts[3], "n", 0)], MODEL_DIMS, "layer 0 expert 1 gate has width 0"),
    (lambda s: [(_moe(s).experts[0], "bias", _moe(s).experts[0].w)], MODEL_UNSUPPORTED, "expert 0 has biases"),
    (lambda s: [(s.layers[0].down, "n", s.hidden)], MODEL_UNSUPPORTED, "experts beside a dense MLP"),
    (lambda s: [(s, "parallel", 1)], MODEL_UNSUPPORTED, "in a parallel block"),
]


@pytest.mark.parametrize("edit,expected,words", MOE_EDITS, ids=[words for _, _, words in MOE_EDITS])
def test_check_model_refuses_expert_layers_the_step_cannot_run(moe_step, edit, expected, words):
    decoder, native = moe_step
    _assert_refused(decoder, native, edit, expected, words)


def _assert_refused(decoder, native, edit, expected, words):
    """lowbit_check_model accepts the step's model, refuses it with `expected` and `words` in its detail after
    `edit` (checks.check_decode_model: a one-line LowbitError), and accepts it again once the edit is undone."""
    lib, spec = native.lib, native.spec
    detail = ctypes.create_string_buffer(256)
    assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == OK
    old = _bend(edit(spec))
    try:
        assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == expected, detail.value
        assert words in detail.value.decode()
        with pytest.raises(LowbitError, match=rf"compiled step: .*\(status {expected}\)$") as error:
            checks.check_decode_model(lib, spec, decoder, native.keep)
        assert "\n" not in str(error.value)
    finally:
        for target, field, value in reversed(old):
            setattr(target, field, value)
    assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == OK


def test_check_status_is_one_line_naming_the_problem():
    checks.check_status(0, "nothing")
    with pytest.raises(LowbitError, match=r"^a 48 x 256 compiled matmul: the input holds fewer values than rows x "
                                          r"inputs \(status 10\)$"):
        checks.check_status(INPUT, "a 48 x 256 compiled matmul", _lib())
    with pytest.raises(LowbitError, match=r"an unknown status \(status 99\)"):
        checks.check_status(99, "x", _lib())
