"""bitsandbytes schemes, methods, kernels and format (issue 5).

bitsandbytes itself (0.50.2, CPU build from PyPI) is the oracle: tables, codes, absmax and nested statistics
must be bit-identical to `bitsandbytes.functional.quantize_4bit`; LLM.int8 with threshold 0 must equal its
int8 pipeline bit for bit. Tests needing it skip with a reason when it is not installed.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.errors import CorruptFile, LowbitError
from lowbit.methods.base import QuantizeConfig, get_method
from lowbit.runtime.qlinear import QuantLinear
from lowbit.schemes.codebook import (Codebook4, codebook, dynamic_map, pack_nibbles, unpack_nibbles)
from lowbit.schemes.int8row import RowInt8

from conftest import SHARED, STORIES

try:
    import bitsandbytes.functional as bnbF
except Exception:  # pragma: no cover - depends on the environment
    bnbF = None
needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes is not installed (pip install bitsandbytes==0.50.2)")
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} (shared test model) is absent")


def _method(name: str, **options) -> object:
    return get_method(QuantizeConfig(method=name, options=options))


def _stories():
    from lowbit.models.loading import load_model

    return load_model(str(STORIES))


# -- tables ------------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_tables_identical_to_bitsandbytes(quant_type):
    assert torch.equal(codebook(quant_type), bnbF.get_4bit_type(quant_type, device="cpu"))


@needs_bnb
def test_dynamic_map_identical_to_bitsandbytes():
    ours = dynamic_map()
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnbF.create_dynamic_map())
    assert torch.equal(dynamic_map(signed=False), bnbF.create_dynamic_map(signed=False))


# -- quantize_4bit bit-exactness ---------------------------------------------------------------------------
def _bnb_reference_dequant(packed, state, shape):
    """The 4-bit format's definition from bitsandbytes' stored data: quant_map[code] * absmax of its flat block."""
    codes = unpack_nibbles(packed, math.prod(shape)).long()
    absmax = state.absmax.float()
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    values = state.code.float()[codes] * absmax.repeat_interleave(state.blocksize)[: codes.numel()]
    return values.reshape(shape)


def _assert_same_as_bnb(weight, quant_type, blocksize, double_quant):
    packed, state = bnbF.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=double_quant)
    scheme = Codebook4(quant_type, blocksize, double_quant)
    qw = scheme.quantize(weight)
    assert torch.equal(scheme.pack(qw), packed), "packed codes differ"
    if double_quant:
        assert torch.equal(qw.extra["absmax_codes"], state.absmax)
        assert torch.equal(qw.extra["nested_absmax"], state.state2.absmax)
        assert torch.equal(qw.extra["nested_offset"], state.offset.reshape(()))
    else:
        assert torch.equal(scheme.flat_absmax(qw), state.absmax)
    ours = qw.dequantize()
    assert torch.equal(ours, _bnb_reference_dequant(packed, state, weight.shape))
    if weight.shape[1] % blocksize == 0:
        # bitsandbytes' C dequantizer is only right when blocks do not straddle rows (it gives wrong values
        # for e.g. a [172, 64] weight with blocksize 256); where it is right we match it too.
        assert torch.equal(ours, bnbF.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_quantize_4bit_bit_identical_randn(quant_type, double_quant, blocksize):
    torch.manual_seed(blocksize)
    weight = torch.randn(384, 512) * 0.02
    weight[0, :40] = 0  # a zero run, and exact zeros inside blocks
    weight[3, 7] = 0.5  # a large value dominating one block
    _assert_same_as_bnb(weight, quant_type, blocksize, double_quant)


@needs_bnb
@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (3, 7), (1000, 13)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_bit_identical_odd_shapes(shape, quant_type):
    """Blocks straddling rows, a tail block, and an odd number of codes (padded with the code of 0)."""
    torch.manual_seed(1)
    weight = torch.randn(*shape)
    for blocksize in (64, 256):
        _assert_same_as_bnb(weight, quant_type, blocksize, double_quant=True)
        _assert_same_as_bnb(weight, quant_type, blocksize, double_quant=False)


@needs_bnb
@needs_stories
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_bit_identical_real_weights(quant_type):
    model, _ = _stories()
    weights = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights["embed"] = model.model.embed_tokens.weight.detach()
    assert len(weights) >= 36
    for weight in weights.values():
        _assert_same_as_bnb(weight, quant_type, 64, double_quant=True)


def test_nibble_order_first_code_in_high_nibble():
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_nibbles(codes).reshape(-1).tolist() == [0x12, 0x30]
    assert pack_nibbles(codes, pad_code=7).reshape(-1).tolist() == [0x12, 0x37]
    assert Codebook4("nf4").zero_code == 7 and Codebook4("fp4").zero_code == 0
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 3), codes.reshape(-1))


# -- error bounds and bits -------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type,expected", [("nf4", 0.073), ("fp4", 0.097)])
def test_error_like_bitsandbytes_tests(quant_type, expected):
    """randn 1024x1024, blocksize 64: mean |error| as in bitsandbytes' test_4bit_quant (NF4 ~0.073, FP4 ~0.097)."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    qw = Codebook4(quant_type, 64).quantize(w)
    err = (qw.dequantize() - w).abs().mean().item()
    assert abs(err - expected) < 0.002, err
    rel = ((qw.dequantize() - w).abs() / w.abs().clamp(min=1e-8)).median().item()
    assert rel < 0.3
    # every error is at most half the widest gap of the table times the block's absmax
    table = torch.sort(codebook(quant_type)).values
    half_gap = ((table[1:] - table[:-1]).max() / 2).item()
    absmax = qw.scales.repeat_interleave(64, dim=1)
    assert bool(((qw.dequantize() - w).abs() <= half_gap * absmax * (1 + 1e-6)).all())


def test_bits_per_weight_nf4_double_quant():
    w = torch.randn(1024, 1024)
    n = w.numel()
    dq = Codebook4("nf4", 64, True).quantize(w)
    plain = Codebook4("nf4", 64, False).quantize(w)
    assert plain.bits_per_weight() == 4.5
    assert dq.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert round(dq.bits_per_weight(), 3) == 4.127


def test_double_quant_error_is_small():
    """Double quantization perturbs each absmax by at most a dynamic-map step of its 256-block."""
    torch.manual_seed(2)
    w = torch.randn(512, 512)
    plain = Codebook4("nf4", 64).quantize(w)
    dq = Codebook4("nf4", 64, True).quantize(w)
    rel = ((dq.scales - plain.scales).abs() / plain.scales).max().item()
    assert rel < 0.02
    assert (dq.dequantize() - w).abs().mean() < (plain.dequantize() - w).abs().mean() * 1.02


def test_bad_settings_raise_clear_errors():
    with pytest.raises(LowbitError, match="blocksize"):
        _method("nf4", blocksize=48).scheme()
    with pytest.raises(LowbitError, match="unknown options"):
        _method("nf4", threshold=6.0)
    with pytest.raises(LowbitError, match="compute dtype"):
        _method("fp4", compute_dtype="int3").scheme()
    with pytest.raises(LowbitError, match="threshold"):
        RowInt8(threshold=-1.0)


# -- LLM.int8 and dynamic int8 ---------------------------------------------------------------------------
@needs_bnb
def test_int8_weights_identical_to_bitsandbytes():
    torch.manual_seed(3)
    w = torch.randn(256, 320)
    cb, scb, _ = bnbF.int8_vectorwise_quant(w.clone())
    qw = RowInt8().quantize(w)
    assert torch.equal(RowInt8().int8_codes(qw), cb) and torch.equal(qw.extra["SCB"], scb)
    assert torch.equal(qw.dequantize(), bnbF.int8_vectorwise_dequant(cb, scb))


@needs_bnb
def test_llm_int8_threshold_zero_is_plain_int8_bitsandbytes():
    """threshold 0: every column in int8; identical to bitsandbytes' int8 quant -> int32 matmul -> dequant."""
    torch.manual_seed(4)
    w, x = torch.randn(192, 256), torch.randn(9, 256) * 3
    qw = _method("int8", threshold=0.0).quantize_weight("layer", w)
    y = QuantLinear(qw)(x)
    ca, sca, _ = bnbF.int8_vectorwise_quant(x.clone())
    cb, scb, _ = bnbF.int8_vectorwise_quant(w.clone())
    acc = torch.ops.bitsandbytes.int8_linear_matmul(ca, cb)
    expected = torch.ops.bitsandbytes.int8_mm_dequant(acc, sca, scb, dtype=torch.float32)
    assert torch.equal(y, expected)


def _planted_outliers(seed: int = 5):
    torch.manual_seed(seed)
    x = torch.randn(32, 512)
    cols = torch.tensor([3, 100, 411])
    x[:, cols] *= 40  # systematic outlier features, as LLM.int8() observed in large models
    w = torch.randn(384, 512) / math.sqrt(512)
    return x, w, cols


def test_llm_int8_outliers_keep_error_far_below_plain_int8():
    x, w, _ = _planted_outliers()
    ref = x @ w.t()
    err = {}
    for t in (0.0, 6.0):
        y = QuantLinear(_method("int8", threshold=t).quantize_weight("l", w))(x)
        err[t] = ((y - ref).norm() / ref.norm()).item()
    # plain int8 spends its 255 levels per token on the outliers; the rest drowns in rounding
    assert err[6.0] < 0.2 * err[0.0], err
    assert err[6.0] < 0.01


def test_llm_int8_kernel_matches_its_math_exactly():
    """Outlier columns in float, others int8: the kernel equals the same decomposition in float64."""
    from lowbit.runtime.bnb_kernels import quantize_rows_absmax

    x, w, cols = _planted_outliers(6)
    qw = RowInt8(threshold=6.0).quantize(w)
    y = QuantLinear(qw)(x)
    outlier = (x.abs() >= 6.0).any(dim=0)
    assert set(outlier.nonzero().squeeze(1).tolist()) >= set(cols.tolist())
    x_int = x.clone()
    x_int[:, outlier] = 0
    xq, row = quantize_rows_absmax(x_int)
    wd = qw.dequantize().double()
    expected = (xq.double() * row.double().unsqueeze(1) / 127) @ wd.t() + x[:, outlier].double() @ wd[:, outlier].t()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_dynamic_int8_kernel_is_exact_int_math():
    """Per-token asymmetric activations: the int32 result with the zero-point correction equals float math on
    the dequantized activations, and the error is bounded by half an activation step per element."""
    torch.manual_seed(7)
    w = torch.randn(200, 300)
    x = torch.rand(11, 300) * 4 - 0.5  # skewed (mostly positive) activations: where asymmetric helps
    qw = _method("dynamic-int8").quantize_weight("l", w)
    layer = QuantLinear(qw)
    assert layer.kernel_name == "dynamic-int8"
    y = layer(x)
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale) - 128
    xq = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], -128, 127)
    x_deq = (xq - zero[:, None]).double() * scale[:, None].double()
    expected = x_deq @ qw.dequantize().double().t()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-4)
    ref = x @ qw.dequantize().t()
    plain = QuantLinear(_method("int8", threshold=0.0).quantize_weight("l", w))(x)
    assert (y - ref).norm() < (plain - ref).norm()  # asymmetric uses the whole int8 range on skewed inputs


# -- kernels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 128), (172, 64), (64, 172)])
def test_bnb4_kernels_match_reference(shape, monkeypatch):
    """Tiled (several tiles, blocks aligned with rows or not) and cached kernels against the dequantized weight."""
    from lowbit.runtime.kernels import KERNELS

    monkeypatch.setattr(KERNELS["bnb4-tiled"], "tile_rows", 40)
    torch.manual_seed(8)
    w = torch.randn(*shape)
    x = torch.randn(5, shape[1])
    for compute, tol in (("fp32", 1e-6), ("bf16", 1e-2)):  # bf16: one rounding of weights and inputs (2^-8)
        qw = _method("nf4", compute_dtype=compute, double_quant=True).quantize_weight("l", w)
        ref = x @ qw.dequantize().t()
        for kernel in ("bnb4-tiled", "bnb4-cached"):
            layer = QuantLinear(qw, kernel=kernel)
            y = layer(x)
            assert layer.kernel_name == kernel
            assert ((y - ref).norm() / ref.norm()).item() < tol, (kernel, compute)


# -- model level: pipeline, footprint, format --------------------------------------------------------------
@needs_stories
def test_pipeline_quantizes_stories_and_reports_footprint():
    from lowbit.eval.footprint import footprint
    from lowbit.methods.pipeline import quantize_model
    from lowbit.runtime.surgery import quantized_modules

    model, tok = _stories()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
    quantize_model(model, QuantizeConfig(method="nf4", options={"double_quant": True, "compute_dtype": "fp32"}),
                   progress=False)
    layers = dict(quantized_modules(model))
    assert len(layers) == 35 and "lm_head" not in layers
    fp = footprint(model)
    assert fp.quantized_bits_per_weight == pytest.approx(4.127, abs=0.01)
    with torch.no_grad():
        logits = model(ids).logits
    # NF4 on a 260K-parameter model moves the logits, but keeps them correlated with the base ones
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), base.flatten(), dim=0).item()
    assert cos > 0.9


@needs_stories
@pytest.mark.parametrize("method,options", [("nf4", {"double_quant": True}), ("fp4", {"blocksize": 128}),
                                            ("int8", {"threshold": 6.0})])
def test_bnb_format_round_trip(tmp_path, method, options):
    from lowbit.formats.registry import find_reader, get_writer
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method=method, options=options), progress=False)
    out = tmp_path / "bnb"
    get_writer("bnb").write(model, tok, out)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] == (method != "int8")
    assert find_reader(out).name == "bnb"
    loaded, _ = load_model(out)
    ids = tok("Once upon a time there was", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    names = dict(loaded.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.qweight.dequantize(), names[name].qweight.dequantize())


@needs_stories
def test_bnb_format_refuses_other_schemes_and_leaves_nothing(tmp_path):
    from lowbit.formats.registry import get_writer
    from lowbit.methods.pipeline import quantize_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    with pytest.raises(LowbitError, match="nf4, fp4 or int8"):
        get_writer("bnb").write(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@needs_stories
def test_truncated_bnb_file_is_a_clear_error(tmp_path):
    from lowbit.formats.registry import get_writer
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method="nf4"), progress=False)
    out = get_writer("bnb").write(model, tok, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptFile, match="truncated or corrupt"):
        load_model(out)


def _transformers_bnb_available() -> bool:
    try:
        import transformers  # noqa: F401
        from transformers import BitsAndBytesConfig  # noqa: F401
    except Exception:
        return False
    return bnbF is not None


needs_hf_bnb = pytest.mark.skipif(not _transformers_bnb_available(),
                                  reason="transformers' bitsandbytes integration is unavailable")


@needs_hf_bnb
@needs_stories
@pytest.mark.parametrize("config", ["nf4-dq", "fp4", "int8"])
def test_lowbit_reads_checkpoints_written_by_transformers(tmp_path, config):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowbit.models.loading import load_model

    settings = {"nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                "int8": dict(load_in_8bit=True)}[config]
    hf = AutoModelForCausalLM.from_pretrained(str(STORIES), quantization_config=BitsAndBytesConfig(**settings),
                                              device_map="cpu", dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    for name, module in hf.named_modules():
        if type(module).__name__ == "Linear4bit":
            expected = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif type(module).__name__ == "Linear8bitLt":
            expected = bnbF.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
        else:
            continue
        assert torch.equal(ours.get_submodule(name).qweight.dequantize(), expected), name


@needs_hf_bnb
@needs_stories
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_transformers_loads_our_bnb_checkpoint(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from lowbit.formats.registry import get_writer
    from lowbit.methods.pipeline import quantize_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method=method, options={"double_quant": True} if method == "nf4" else {}),
                   progress=False)
    out = get_writer("bnb").write(model, tok, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        theirs = hf.get_submodule(name)
        if method == "nf4":
            expected = bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float()
        else:
            expected = bnbF.int8_vectorwise_dequant(theirs.weight.data, theirs.weight.SCB)
        assert torch.equal(module.qweight.dequantize(), expected), name
        checked += 1
    assert checked == 35


# -- real activations --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_llm_int8_on_real_smollm2_activations():
    """SmolLM2-135M has activation outliers above 6 in late layers: LLM.int8 beats plain int8 there."""
    from lowbit.models.loading import load_model

    try:
        model, tok = load_model("smollm2")
    except LowbitError as exc:
        pytest.skip(str(exc))
    text = (SHARED / "corpora" / "wikitext2-raw-test.txt").read_text()[:3000]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    captured = {}
    hooks = [model.model.layers[i].get_submodule(n).register_forward_hook(
        lambda mod, inp, out, key=(i, n): captured.__setitem__(key, (inp[0][0].detach(), mod.weight.detach())))
        for i in (15, 29) for n in ("self_attn.q_proj", "mlp.gate_proj")]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    improved = 0
    for key, (x, w) in captured.items():
        ref = x @ w.t()
        err = {t: ((QuantLinear(RowInt8(threshold=t).quantize(w))(x) - ref).norm() / ref.norm()).item()
               for t in (0.0, 6.0)}
        assert err[6.0] <= err[0.0] * 1.0001, (key, err)
        if (x.abs() >= 6).any() and err[6.0] < 0.6 * err[0.0]:
            improved += 1
    assert improved >= 2


def test_bnb4_int8_kernel_error_is_bounded():
    """The int8 requantization moves each weight by at most |row max| / 254; bf16 activations add ~2^-9."""
    from lowbit.runtime.bnb_kernels import Codebook4Int8Kernel

    torch.manual_seed(9)
    w, x = torch.randn(256, 512), torch.randn(4, 512)
    qw = _method("nf4").quantize_weight("l", w)
    requantized = Codebook4Int8Kernel._as_int8(qw).dequantize()
    exact = qw.dequantize()
    bound = exact.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)
    assert bool(((requantized - exact).abs() <= bound).all())
    layer = QuantLinear(qw, kernel="bnb4-int8")
    ref = x @ exact.t()
    assert layer.kernel_name == "bnb4-int8"
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02
    # a width torch's int8 kernel needs padded (172 is not a multiple of 16)
    odd = _method("nf4").quantize_weight("l", torch.randn(64, 172))
    layer, x = QuantLinear(odd, kernel="bnb4-int8"), torch.randn(5, 172)
    ref = x @ odd.dequantize().t()
    assert layer.kernel_name == "bnb4-int8" and ((layer(x) - ref).norm() / ref.norm()).item() < 0.02


@needs_stories
@pytest.mark.parametrize("method,options", [("nf4", {"double_quant": True, "blocksize": 32}), ("fp4", {}),
                                            ("int8", {"threshold": 4.0}), ("dynamic-int8", {})])
def test_native_format_round_trip(tmp_path, method, options):
    """lowbit's own format stores these schemes compactly and rebuilds them exactly."""
    from lowbit.formats.registry import get_writer
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method=method, options=options), progress=False)
    out = get_writer("lowbit").write(model, tok, tmp_path / "native")
    loaded, _ = load_model(out)
    ids = tok("Lily and Ben went to the park", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    layer = loaded.model.layers[2].mlp.down_proj
    assert layer.qweight.scheme == model.model.layers[2].mlp.down_proj.qweight.scheme


@needs_stories
def test_load_time_quantization_api():
    import lowbit.api

    model = lowbit.api.load(str(STORIES), quantize=QuantizeConfig(method="nf4", options={"double_quant": True}))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.scheme == Codebook4("nf4", 64, True)
    model8 = lowbit.api.load(str(STORIES), quantize="int8")
    assert model8.model.layers[0].mlp.up_proj.kernel_name == "llm-int8"
    ids = model.tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all() and torch.isfinite(model8(ids).logits).all()
