"""GPTQ: error compensation beats round-to-nearest on the same grid; act-order, static groups, damping."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.gptq import HessianAccumulator, damped_inverse_factor, gptq_quantize, output_relative_error
from lowbit.schemes.intgrid import IntGrid


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, like a transformer's (GPTQ needs correlation)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    x = torch.randn(tokens, k, generator=g) @ mix + 0.1 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 8
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(1000):
        acc.add(chunk)
    return acc.hessian()


def test_hessian_accumulator_matches_definition():
    x = torch.randn(3000, 48)
    h = hessian_of(x)
    assert torch.allclose(h, (2 * x.double().t() @ x.double() / 3000), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", [IntGrid(4, 64, True), IntGrid(3, 32, False), IntGrid(4, -1, True),
                                  IntGrid(2, 64, False), IntGrid(8, 128, True)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_below_rtn_random_layer(grid, desc_act):
    torch.manual_seed(1)
    x = correlated_inputs(4096, 256)
    w = torch.randn(96, 256) * 0.05
    qw, report = gptq_quantize(w, hessian_of(x), grid, desc_act=desc_act)
    gptq_err = output_relative_error(w, qw, x)
    rtn_err = output_relative_error(w, grid.quantize(w), x)
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)
    # The reported relative error is the same quantity computed through H (sum of squares, not the norm).
    assert report.relative_error == pytest.approx(gptq_err ** 2, rel=1e-3)
    # Codes stay on the grid and the statistics are fp16-exact, as the GPTQ/AWQ formats need.
    assert int(qw.codes.max()) <= grid.maxq
    assert torch.equal(qw.scales.half().float(), qw.scales)


def test_act_order_g_idx_is_consistent_and_dequantizes():
    torch.manual_seed(2)
    k, n, g = 128, 32, 32
    x = correlated_inputs(2048, k, seed=3)
    h = hessian_of(x)
    w = torch.randn(n, k) * 0.1
    grid = IntGrid(4, g, False)
    qw, _ = gptq_quantize(w, h, grid, desc_act=True)
    assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
    # act-order: columns sorted by decreasing diag(H) fill the groups in order, g columns each.
    perm = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(k) // g)
    assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((k // g,), g))
    # Dequantization through g_idx, written out by hand.
    gi = qw.g_idx.long()
    manual = qw.scales[:, gi] * (qw.codes.float() - qw.zeros[:, gi])
    assert torch.equal(qw.dequantize(), manual)
    # And it is really not the contiguous layout.
    assert not torch.equal(gi, torch.arange(k) // g)


def test_static_groups_keep_contiguous_groups_and_beat_rtn():
    torch.manual_seed(4)
    x = correlated_inputs(4096, 128, seed=5)
    w = torch.randn(64, 128) * 0.05
    grid = IntGrid(4, 32, True)
    qw, _ = gptq_quantize(w, hessian_of(x), grid, desc_act=True, static_groups=True)
    rtn = grid.quantize(w)
    assert qw.g_idx is None
    # Static groups: statistics are fixed from the original weights, exactly RTN's.
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
    assert output_relative_error(w, qw, x) < output_relative_error(w, rtn, x)


def test_non_positive_definite_hessian_is_damped_and_reported(caplog):
    torch.manual_seed(6)
    x = torch.randn(10, 64)              # 10 tokens: H has rank 10 < 64, singular without damping
    h = hessian_of(x)
    w = torch.randn(16, 64)
    with caplog.at_level("WARNING", logger="lowbit"):
        qw, report = gptq_quantize(w, h, IntGrid(4, 32, True), damp=0.0, name="layer.x")
    assert report.retries >= 1 and report.damp > 0
    assert "not positive definite" in caplog.text and "layer.x" in caplog.text
    assert torch.isfinite(qw.dequantize()).all()


def test_damping_leaves_the_hessian_as_it_was():
    """Damping is added to H's diagonal in place: after success, after retries and after failure H is unchanged."""
    torch.manual_seed(6)
    singular = hessian_of(torch.randn(10, 64))
    for h, damp in ((hessian_of(correlated_inputs(512, 64)), 0.01), (singular, 0.0)):
        before = h.clone()
        upper, used, _ = damped_inverse_factor(h, damp)
        assert torch.equal(h, before)
        damped = before + used * before.diagonal().mean() * torch.eye(64, dtype=torch.float64)
        # U^T U = (H + damp I)^-1, the factor GPTQ's updates use
        assert torch.allclose((upper.double().t() @ upper.double()) @ damped, torch.eye(64, dtype=torch.float64),
                              atol=1e-3)
    nan = torch.full((8, 8), float("nan"), dtype=torch.float64)
    with pytest.raises(LowbitError):
        damped_inverse_factor(nan, 0.01)
    assert nan.isnan().all()


@pytest.mark.parametrize("desc_act", [False, True])
def test_consuming_the_hessian_gives_the_same_codes_and_report(desc_act):
    torch.manual_seed(8)
    x = correlated_inputs(1024, 96)
    x[:, 5] = 0                                   # a dead input, whose diagonal is patched in the working copy
    w = torch.randn(24, 96)
    h = hessian_of(x)
    kept, report = gptq_quantize(w, h, IntGrid(4, 32, False), desc_act=desc_act)
    consumed, consumed_report = gptq_quantize(w, h.clone(), IntGrid(4, 32, False), desc_act=desc_act,
                                              consume_hessian=True)
    assert torch.equal(kept.dequantize(), consumed.dequantize())
    assert consumed_report.relative_error == pytest.approx(report.relative_error, rel=1e-9)
    # and the report is ||(W-Q)X||^2 / ||WX||^2 on the calibration tokens
    assert report.relative_error == pytest.approx(output_relative_error(w, kept, x) ** 2, rel=1e-4)


def test_hessian_that_cannot_be_fixed_raises_clear_error():
    h = torch.full((8, 8), float("nan"))
    with pytest.raises(LowbitError, match="not positive definite"):
        damped_inverse_factor(h, 0.01, "bad")


def test_dead_inputs_are_zeroed():
    torch.manual_seed(7)
    x = correlated_inputs(1024, 64)
    x[:, 10] = 0                          # an input channel that never fires
    w = torch.randn(32, 64)
    qw, _ = gptq_quantize(w, hessian_of(x), IntGrid(4, -1, True))
    assert torch.all(qw.dequantize()[:, 10] == 0)


def test_gptq_drives_other_schemes_through_encode_decode():
    """GGUF's Q4_0 blocks: statistics fixed from the weights, GPTQ re-chooses the codes."""
    ggml = pytest.importorskip("lowbit.schemes.ggml")
    torch.manual_seed(8)
    x = correlated_inputs(2048, 128, seed=9)
    w = torch.randn(32, 128) * 0.05
    scheme = ggml.GGMLScheme("Q4_0")
    qw, _ = gptq_quantize(w, hessian_of(x), scheme)
    assert output_relative_error(w, qw, x) < 0.9 * output_relative_error(w, scheme.quantize(w), x)
    # The stored blocks were rebuilt from the new codes.
    assert torch.equal(qw.dequantize(), scheme.from_blocks(qw.extra["blocks"], (32, 128)).dequantize())


def real_layer_inputs(model, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """Activations entering `layer` when the model runs on `tokens`."""
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])


@pytest.fixture(scope="module")
def stories_split(stories, tinystories_text):
    """TinyStories tokens split into a calibration part and a held-out evaluation part."""
    from lowbit.calibration.text import tokenize_for_calibration
    from lowbit.eval.perplexity import read_text

    _, tok = stories
    tokens = tokenize_for_calibration(tok, read_text(tinystories_text)[:200_000])
    return tokens[:-8192], tokens[-8192:]


@pytest.mark.parametrize("layer,grid", [("model.layers.2.self_attn.q_proj", IntGrid(4, 32, True)),
                                        ("model.layers.2.mlp.down_proj", IntGrid(3, -1, False)),
                                        ("model.layers.4.mlp.up_proj", IntGrid(4, 32, False))])
def test_gptq_below_rtn_on_real_stories_layers(stories, stories_split, layer, grid):
    from lowbit.calibration.text import sample_windows

    model, _ = stories
    calib = sample_windows(stories_split[0], 16, 256, seed=0)
    held_out = stories_split[1].reshape(-1, 256)[:8]
    w = model.get_submodule(layer).weight.detach()
    qw, _ = gptq_quantize(w, hessian_of(real_layer_inputs(model, calib, layer)), grid)
    x_test = real_layer_inputs(model, held_out, layer)
    assert output_relative_error(w, qw, x_test) < output_relative_error(w, grid.quantize(w), x_test)


@pytest.mark.slow
def test_gptq_below_rtn_on_real_smollm2_layer(smollm2, wikitext):
    from lowbit.calibration.text import calibration_from_file

    model, tok = smollm2
    layer = "model.layers.10.mlp.down_proj"
    calib = calibration_from_file(tok, wikitext, 24, 256, seed=0)   # 6k tokens for K = 1536: H well determined
    held_out = calibration_from_file(tok, wikitext, 2, 256, seed=1)
    w = model.get_submodule(layer).weight.detach()
    grid = IntGrid(4, 128, True)
    qw, _ = gptq_quantize(w, hessian_of(real_layer_inputs(model, calib, layer)), grid)
    x_test = real_layer_inputs(model, held_out, layer)
    assert output_relative_error(w, qw, x_test) < 0.95 * output_relative_error(w, grid.quantize(w), x_test)


# -- end to end on stories260K -----------------------------------------------------------------------------
def perplexity_after(method: str, stories_dir, calib, eval_tokens, bits: int, group: int, symmetric: bool,
                     **options) -> float:
    from lowbit.eval.perplexity import evaluate_quality
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, _ = load_model(stories_dir)
    config = QuantizeConfig(method=method, bits=bits, group_size=group, symmetric=symmetric, options=options)
    quantize_model(model, config, calibration=calib, progress=False)
    return evaluate_quality(model, eval_tokens, ctx=256, progress=False).perplexity


@pytest.fixture(scope="module")
def stories_eval(stories_split):
    from lowbit.calibration.text import sample_windows

    calib_tokens, eval_tokens = stories_split
    return sample_windows(calib_tokens, 32, 256, seed=0), eval_tokens[:4096]


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False)])
def test_gptq_perplexity_better_than_rtn_on_stories(stories_dir, stories_eval, bits, symmetric):
    calib, eval_tokens = stories_eval
    # Group 32 on every layer; the MLP's 172-wide down_proj gets a short last group (172 = 5*32 + 12).
    rtn = perplexity_after("rtn", stories_dir, calib, eval_tokens, bits, 32, symmetric)
    gptq = perplexity_after("gptq", stories_dir, calib, eval_tokens, bits, 32, symmetric)
    assert gptq < rtn, (gptq, rtn)


def test_linears_reading_one_tensor_share_its_product_bit_for_bit():
    """q/k/v (and gate/up) read the very same tensor: one X^T X serves them all, each Hessian exactly as if
    accumulated alone; a tensor changed in place is not mistaken for the one already multiplied."""
    from lowbit.methods.gptq import InputProducts

    torch.manual_seed(10)
    calls = [correlated_inputs(300, 40, seed=s).reshape(3, 100, 40) for s in range(3)]
    alone = HessianAccumulator(40)
    shared = [HessianAccumulator(40) for _ in range(3)]
    products = InputProducts()
    for x in calls:
        alone.add(x)
        for acc in shared:
            acc.add(x, products)
    for acc in shared:
        assert acc.count == alone.count == 900
        assert torch.equal(acc.sum, alone.sum)
    x = calls[0]
    before = products.product(x).clone()
    x.mul_(2)                                           # same object, new values
    assert torch.equal(products.product(x), 4 * before)
    # the input is not kept alive by the cache (activations are freed after their forward pass)
    import weakref

    alive = weakref.ref(x)
    del x, calls
    assert alive() is None


# SHA-256 of codes, scales, zeros (and g_idx) of the layer below, computed with the sweep before it kept its
# columns as contiguous rows (commit a41d99b; torch 2.13 CPU, one thread). Groups of 48 straddle blocks of 32, so
# a group's statistics are fitted on columns from the current block and the next one.
PINNED_DYNAMIC_GROUPS = {
    False: "73e666bcb31a7b4003cc66b94c08c8a3d803f796a753748645f286b2587811c9",
    True: "f66fa9b87ca17f5d84fa4acc93bb660b8ec1c91d38c6c494c57d0840c0f9b751",
}


@pytest.mark.parametrize("desc_act", [False, True])
def test_sweep_codes_equal_those_of_the_previous_layout(desc_act):
    import hashlib

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = correlated_inputs(2048, 200, seed=11)
        w = torch.randn(40, 200, generator=torch.Generator().manual_seed(12))
        qw, _ = gptq_quantize(w, hessian_of(x), IntGrid(4, 48, False), desc_act=desc_act, static_groups=False,
                              block_size=32)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for t in (qw.codes, qw.scales, qw.zeros) + ((qw.g_idx,) if qw.g_idx is not None else ()):
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest() == PINNED_DYNAMIC_GROUPS[desc_act]
