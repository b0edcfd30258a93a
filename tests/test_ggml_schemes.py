"""GGUF block types: bytes identical to gguf.quants (Q4_0..Q8_0) and llama.cpp's reference quantizers
(K-quants, via libgguf), dequantization identical to gguf.quants.dequantize, codes/statistics consistent."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from lowbit.schemes import scheme_from_config  # noqa: E402
from lowbit.schemes.ggml import CODECS, GGMLScheme, dequantize_rows, quantize_rows  # noqa: E402
from conftest import STORIES  # noqa: E402

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _libgguf():
    return pytest.importorskip("libgguf", reason="libgguf (llama.cpp's reference quantizers) is not installed")


def hard_weights(rows: int = 24, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the awkward cases: a zero row, a zero block, heavy tails, constant and tiny blocks."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, cols)).astype(np.float32) * 0.02
    x[1] = 0
    x[2, :256] = 0
    x[3] = rng.standard_t(2, size=cols).astype(np.float32)
    x[4, :64] = 0.5
    x[5] = x[5] * 1e-6
    x[6] = np.abs(x[6])
    x[7] = -np.abs(x[7])
    x[8, 100:140] = 3.0
    return x


def real_weights() -> np.ndarray:
    path = str(STORIES / "model.safetensors")
    try:
        from safetensors.numpy import load_file
        state = load_file(path)
    except (FileNotFoundError, OSError):
        pytest.skip(f"stories260K is not available at {STORIES}")
    w = state["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)  # [64, 64]
    return np.tile(w, (1, 4))  # 256 columns so every K-quant applies


@pytest.mark.parametrize("type_name", LEGACY)
@pytest.mark.parametrize("source", ["random", "real"])
def test_legacy_types_match_gguf_quants_bytes(type_name, source):
    x = hard_weights() if source == "random" else real_weights()
    ours = quantize_rows(x, type_name)
    ref = gguf_quantize(x, GT[type_name])
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
@pytest.mark.parametrize("source", ["random", "real"])
def test_all_types_match_llama_cpp_reference_bytes(type_name, source):
    libgguf = _libgguf()
    x = hard_weights(seed=1) if source == "random" else real_weights()
    ref = libgguf.quantize_rows(x, getattr(libgguf.GGMLQuantizationType, type_name)).view(np.uint8)
    np.testing.assert_array_equal(quantize_rows(x, type_name), ref.reshape(x.shape[0], -1))


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
def test_importance_weighted_search_matches_llama_cpp(type_name):
    libgguf = _libgguf()
    x = hard_weights(seed=2)
    importance = (np.random.default_rng(3).random(x.shape[1]) ** 3).astype(np.float32)
    ref = libgguf.quantize_rows(x, getattr(libgguf.GGMLQuantizationType, type_name), imatrix=importance)
    ours = quantize_rows(x, type_name, importance)
    np.testing.assert_array_equal(ours, ref.view(np.uint8).reshape(x.shape[0], -1))


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
def test_dequantize_matches_gguf_dequantize_exactly(type_name):
    x = hard_weights(seed=4)
    blocks = quantize_rows(x, type_name)
    ref = gguf_dequantize(blocks, GT[type_name])
    np.testing.assert_array_equal(dequantize_rows(blocks, type_name), ref)
    # the scheme's own view (codes + per-group statistics) decodes to the same values
    qw = GGMLScheme(type_name).quantize(torch.from_numpy(x))
    np.testing.assert_array_equal(qw.dequantize().numpy(), ref)


@pytest.mark.parametrize("type_name", LEGACY + KQUANTS)
def test_codes_round_trip_to_identical_blocks(type_name):
    scheme = GGMLScheme(type_name)
    x = torch.from_numpy(hard_weights(seed=5))
    qw = scheme.quantize(x)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= CODECS[type_name].maxq
    assert qw.scales.shape == (x.shape[0], x.shape[1] // CODECS[type_name].group)
    np.testing.assert_array_equal(scheme.blocks(qw), qw.extra["blocks"].numpy())
    # GPTQ-style use: encode with the fixed statistics reproduces codes whose decode is at least as close
    gi = qw.group_index()
    scales, zeros = qw.scales.index_select(1, gi), qw.zeros.index_select(1, gi)
    recoded = scheme.encode(x, scales, zeros)
    err_fixed = (scheme.decode(recoded, scales, zeros) - x).abs()
    err_ref = (qw.dequantize() - x).abs()
    assert float(err_fixed.sum()) <= float(err_ref.sum()) * 1.0001
    rebuilt = scheme.with_codes(qw, recoded)
    np.testing.assert_array_equal(dequantize_rows(rebuilt.extra["blocks"].numpy(), type_name),
                                  rebuilt.dequantize().numpy())


def test_scheme_config_round_trip_and_bits():
    scheme = GGMLScheme("q4_k")
    assert scheme.type == "Q4_K"
    assert scheme_from_config(scheme.to_config()) == scheme
    qw = scheme.quantize(torch.randn(8, 256))
    assert qw.bits_per_weight() == pytest.approx(4.5)


def test_row_width_error_names_the_fix():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="multiple of 256"):
        quantize_rows(np.zeros((2, 96), np.float32), "Q4_K")


def test_vectorised_q4_k_matches_the_scalar_reference():
    """The fast path against ggml_reference's line-by-line port (independent of libgguf)."""
    from lowbit.schemes.ggml_blocks import fp16_values
    from lowbit.schemes.ggml_kquants import Q4K, unpack_scale_min_k4
    from lowbit.schemes.ggml_reference import quantize_block_q4_k

    x = hard_weights(rows=10, cols=256, seed=7)
    blocks = quantize_rows(x, "Q4_K")
    for row in range(x.shape[0]):
        d, dmin, ls, lm, codes = quantize_block_q4_k(x[row])
        b = blocks[row:row + 1]
        assert fp16_values(b[:, 0:2])[0] == np.float32(d) and fp16_values(b[:, 2:4])[0] == np.float32(dmin)
        sc, mn = unpack_scale_min_k4(b[:, 4:16])
        assert sc[0].tolist() == ls and mn[0].tolist() == lm
        assert Q4K.codes(b)[0].tolist() == codes


def test_importance_lowers_the_weighted_error():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 512)).astype(np.float32)
    importance = np.exp(rng.normal(scale=2.0, size=512)).astype(np.float32)
    for type_name in ("Q4_K", "Q3_K", "Q4_0"):
        plain = dequantize_rows(quantize_rows(x, type_name), type_name)
        weighted = dequantize_rows(quantize_rows(x, type_name, importance), type_name)
        err = lambda w: float((importance * (w - x) ** 2).sum())  # noqa: E731
        assert err(weighted) < err(plain), type_name


def test_native_tensors_round_trip_exactly():
    scheme = GGMLScheme("Q5_K")
    qw = scheme.quantize(torch.from_numpy(hard_weights(seed=9)))
    back = scheme.from_tensors(scheme.to_tensors(qw), qw.shape, qw.group_size)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scales, qw.scales)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert GGMLScheme("Q4_0").affine_bits == 4 and GGMLScheme("Q4_K").affine_bits is None
