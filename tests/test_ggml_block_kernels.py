"""The compiled kernels reading GGUF blocks as the file stores them (runtime/csrc/ggml_blocks.h) against gguf-py's
reference dequantization: every block type, float32 and int8 activations, one and many activation rows, row
widths that are not multiples of 256 where the type allows, sizes refused before C, the portable build, and
greedy generation from a GGUF file against the torch path."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.runtime import clib
from lowbit.schemes.ggml import codec, quantize_rows

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# (type, rows, width): 32-value types at widths that are not multiples of 256, K-quants at two superblock counts
CASES = [(t, 37, 160) for t in LEGACY] + [(t, 33, 96) for t in LEGACY] + [(t, 35, 512) for t in K_QUANTS]


def _weight(type_name: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(block bytes [n, row_bytes] from lowbit's reference-identical quantizer, their float64 values from
    gguf-py's dequantize). Rows of different magnitudes, so that the per-block scales differ."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    blocks = quantize_rows(w, type_name)
    dense = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name]).astype(np.float64)
    return blocks, dense.reshape(n, k)


def _spec(type_name: str, blocks: np.ndarray, n: int, k: int):
    return clib.ggml_block_spec(torch.from_numpy(blocks), type_name, (n, k))


def _float_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Worst-case float32 rounding of a K-term dot product in any order (with products rounded): (K+1) eps sum|xw|."""
    return (x.shape[1] + 1) * 2.0 ** -23 * (np.abs(x) @ np.abs(w).T) + 1e-6


def _act8_rounded(x: np.ndarray, qblock: int) -> tuple[np.ndarray, np.ndarray]:
    """The activations the int8 kernels compute with (float32 arithmetic of ggml_blocks.h's quantizer), and the
    scale of each activation block [M, K / qblock]."""
    x = x.astype(np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // qblock, qblock)
    top = np.abs(xb).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(top > 0, np.float32(127) / top, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    d = (top / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k), d[..., 0].astype(np.float64)


def _linear(spec, x: np.ndarray, act8: bool, lib=None) -> np.ndarray:
    return clib.linear(spec, torch.from_numpy(x.astype(np.float32)), act8=act8, lib=lib).double().numpy()


@pytest.mark.parametrize("type_name,n,k", CASES)
def test_dequantized_rows_are_gguf_values_exactly(type_name, n, k):
    """Prompt-sized matmuls dequantize slices of rows in C: bit for bit gguf-py's float32 values."""
    blocks, dense = _weight(type_name, n, k)
    spec, keep = _spec(type_name, blocks, n, k)
    out = torch.empty(n - 3, k)
    assert clib.native_library().lowbit_dequantize_rows(ctypes.byref(spec), 3, n, out.data_ptr(), out.numel() * 4, 0,
                                                        2) == 0
    assert np.array_equal(out.numpy(), dense[3:].astype(np.float32))


@pytest.mark.parametrize("type_name,n,k", CASES)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_float_activations_match_the_dequantized_matmul(type_name, n, k, rows):
    blocks, dense = _weight(type_name, n, k, seed=rows)
    spec, keep = _spec(type_name, blocks, n, k)
    x = np.random.default_rng(rows).standard_normal((rows, k))
    x32 = x.astype(np.float32).astype(np.float64)
    y = _linear(spec, x, act8=False)
    assert (np.abs(y - x32 @ dense.T) <= _float_bound(x32, dense)).all()


@pytest.mark.parametrize("type_name,n,k", CASES)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_activations_are_llama_cpp_arithmetic(type_name, n, k, rows):
    """act8: exactly the dequantized weight times the int8-rounded activations, to float32 rounding; and within
    the rounding bound of the activations against the float result: half a scale per value,
    sum over activation blocks of dx / 2 * sum |w|."""
    blocks, dense = _weight(type_name, n, k, seed=rows + 7)
    spec, keep = _spec(type_name, blocks, n, k)
    x = np.random.default_rng(rows + 7).standard_normal((rows, k)) * np.linspace(0.1, 3.0, k)
    x32 = x.astype(np.float32).astype(np.float64)
    qblock = codec(type_name).block
    rounded, scales = _act8_rounded(x, qblock)
    y = _linear(spec, x, act8=True)
    assert (np.abs(y - rounded @ dense.T) <= 4 * _float_bound(rounded, dense)).all()
    w_blocks = np.abs(dense).reshape(n, k // qblock, qblock).sum(axis=2)    # [n, blocks]
    act_bound = (scales / 2) @ w_blocks.T * (1 + 1e-5)
    assert (np.abs(y - x32 @ dense.T) <= act_bound + 4 * _float_bound(x32, dense)).all()


def test_threads_agree_and_bias_is_added():
    """Rows shared over 1 or 2 threads give the same numbers; a bias lands on every row."""
    blocks, dense = _weight("Q4_K", 41, 256)
    spec, keep = _spec("Q4_K", blocks, 41, 256)
    bias = torch.randn(41)
    spec.bias = bias.data_ptr()
    x = torch.randn(2, 256)
    torch.set_num_threads(1)
    one = clib.linear(spec, x)
    torch.set_num_threads(2)
    two = clib.linear(spec, x)
    assert torch.equal(one, two)
    expected = x.double() @ torch.from_numpy(dense).T + bias.double()
    assert ((one.double() - expected).abs() <= torch.from_numpy(_float_bound(x.double().numpy(), dense))).all()


@pytest.mark.parametrize("type_name,shape,size,message", [
    ("Q4_0", (4, 100), 4 * 3 * 18, "multiple of 32"),
    ("Q4_K", (4, 384), 4 * 144, "multiple of 256"),
    ("Q6_K", (4, 256), 4 * 210 - 1, "cannot be the Q6_K blocks"),
    ("IQ4_NL", (4, 256), 4 * 8 * 18, "unknown GGUF block type"),
])
def test_bad_sizes_are_refused_before_c(type_name, shape, size, message):
    with pytest.raises(LowbitError, match=message):
        clib.ggml_block_spec(torch.zeros(size, dtype=torch.uint8), type_name, shape)


def test_gguf_weights_are_read_in_place_without_codes():
    """A GGUF QuantizedWeight's description points at its own block bytes, and describing it derives no codes."""
    from lowbit.schemes.ggml import GGMLScheme

    blocks, _ = _weight("Q6_K", 8, 256)
    qw = GGMLScheme("Q6_K").from_blocks(blocks, (8, 256))
    spec, keep = clib.affine_spec(qw)
    assert spec.kind == clib.GGML_KINDS["Q6_K"] and spec.w == qw.extra["blocks"].data_ptr()
    assert qw.__dict__.get("_codes") is None and clib.reads_blocks(qw)


def test_portable_build_matches(tmp_path):
    """The library built without -march=native (the portable integer and float loops) gives the same numbers."""
    result = clib.compile_library(tmp_path / "portable.so", march_native=False)
    assert result.returncode == 0, result.stderr
    portable = clib.load_library(tmp_path / "portable.so")
    for type_name, n, k in CASES[::2]:
        blocks, dense = _weight(type_name, n, k)
        spec, keep = _spec(type_name, blocks, n, k)
        x = np.random.default_rng(1).standard_normal((3, k))
        x32 = x.astype(np.float32).astype(np.float64)
        assert (np.abs(_linear(spec, x, False, portable) - x32 @ dense.T) <= _float_bound(x32, dense)).all()
        rounded, _ = _act8_rounded(x, codec(type_name).block)
        y8 = _linear(spec, x, True, portable)
        assert (np.abs(y8 - rounded @ dense.T) <= 4 * _float_bound(rounded, dense)).all(), type_name


# -- whole models from GGUF files ------------------------------------------------------------------------------

def _greedy_reference(model, prompt: list[int], count: int) -> list[int]:
    """transformers' own forward and KV cache on the dequantized weights, argmax each step."""
    from lowbit.runtime.surgery import dequantized_copy

    reference = dequantized_copy(model)
    with torch.inference_mode():
        out = reference(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(count - 1):
            out = reference(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _block_kinds(model) -> set[str]:
    from lowbit.runtime.qlinear import QuantLinear

    return {m.qweight.scheme.type for m in model.modules()
            if isinstance(m, QuantLinear) and clib.reads_blocks(m.qweight)}


@pytest.fixture(scope="module")
def wide_llama_gguf(tmp_path_factory, stories):
    """A random Llama whose rows are multiples of 256 (so the K-quants apply) with stories260K's tokenizer, written
    by lowbit's GGUF writer as Q4_K_M (Q4_K, Q6_K; Q8_0 would be the tied head) and Q6_K."""
    from conftest import tiny_llama

    from lowbit.formats.gguf import export_gguf

    _, tokenizer = stories
    model = tiny_llama(hidden=256, intermediate=512, layers=2, vocab=512, seed=5)
    with torch.no_grad():       # peakier logits than the default init, so greedy choices are clear
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    folder = tmp_path_factory.mktemp("wide")
    return {mix: export_gguf(model, tokenizer, folder / f"wide.{mix}.gguf", type=mix, progress=False)
            for mix in ("Q4_K_M", "Q6_K", "Q5_K_M")}


@pytest.mark.parametrize("mix,kinds", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("Q6_K", {"Q6_K"}), ("Q5_K_M", {"Q5_K"})])
def test_gguf_generate_equals_torch_reference(wide_llama_gguf, stories, mix, kinds):
    """Loaded kept quantized, the engine's compiled step reads the file's blocks (float32 activations) and gives
    the same 32 greedy tokens as transformers on the dequantized weights."""
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    _, tokenizer = stories
    model, _ = load_model(wide_llama_gguf[mix], keep_quantized=True)
    assert kinds <= _block_kinds(model)
    prompt = tokenizer("Once upon a time").input_ids
    engine = Engine(model, tokenizer, context=96, prefill_attention_dtype=torch.float32, activations="float32")
    assert engine.decoder.native is not None
    ours = list(engine.generate(prompt, SamplingParams(max_new_tokens=32, temperature=0.0), stop_on_eos=False))
    assert ours == _greedy_reference(model, prompt, 32)


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_stories_gguf_generate_equals_torch_reference(tmp_path, stories, mix):
    """stories260K (real weights; rows of 64 columns take the 32-value fallbacks Q5_0 / Q8_0) written by lowbit's
    writer: 40 greedy tokens from the blocks equal transformers on the dequantized weights."""
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.formats.gguf import export_gguf
    from lowbit.models.loading import load_model

    source, tokenizer = stories
    model, _ = load_model(export_gguf(source, tokenizer, tmp_path / f"s.{mix}.gguf", type=mix, progress=False),
                          keep_quantized=True)
    assert _block_kinds(model)
    prompt = tokenizer("Once upon a time").input_ids
    engine = Engine(model, tokenizer, context=96, prefill_attention_dtype=torch.float32, activations="float32")
    assert engine.decoder.native is not None
    ours = list(engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0.0), stop_on_eos=False))
    assert ours == _greedy_reference(model, prompt, 40)


def test_int8_activation_batches_stay_on_the_compiled_step(wide_llama_gguf, stories):
    """With int8 activations (the default on GGUF blocks) a decode batch above PREFILL_ROWS rows runs through
    the compiled step (which reuses each unpacked block for 16 rows; see runner.COMPILED_BATCH_ROWS), and each
    row's tokens equal that sequence decoded alone."""
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model
    from lowbit.runtime.fast_kernels import PREFILL_ROWS

    _, tokenizer = stories
    model, _ = load_model(wide_llama_gguf["Q4_K_M"], keep_quantized=True)
    words = ("Once", "Tom", "The sun", "A cat", "Lily", "One day", "Ben", "The dog", "Sue", "A bird")
    prompts = [tokenizer(f"{w} {v}").input_ids for w in words for v in ("was", "had")][:PREFILL_ROWS + 2]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    single = Engine(model, tokenizer, context=64, activations="int8", threads=1)
    alone = [list(single.generate(p, greedy, stop_on_eos=False)) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=len(prompts), context=64, activations="int8", threads=1)
    assert engine.decoder.compiled_batch_rows > len(prompts)
    rows = []

    class CountedStep:
        """The compiled step, recording how many rows each decode call gave it."""

        def __init__(self, step):
            self.step = step

        def __call__(self, tokens, *args):
            rows.append(len(tokens))
            return self.step(tokens, *args)

        def __getattr__(self, name):
            return getattr(self.step, name)

    engine.decoder.native = CountedStep(engine.decoder.native)
    seqs = [engine.start(p, greedy, stop_on_eos=False) for p in prompts]
    while not all(s.finished for s in seqs):
        engine.step()
    assert max(rows) == len(prompts)                  # the full batch ran the compiled step
    assert [s.generated for s in seqs] == alone
