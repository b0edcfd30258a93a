"""AWQ: scale folding is exact, scales and clipping reduce output error, and perplexity beats RTN."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.methods.awq import apply_clip, awq_scales, can_fold, clip_ranges, fold_scales, weight_salience
from lowbit.schemes.intgrid import IntGrid


def test_awq_scales_formula_and_normalisation():
    x_mean = torch.tensor([1.0, 4.0, 0.25, 2.0])
    w_mean = torch.tensor([0.5, 0.5, 1.0, 0.25])
    s = awq_scales(x_mean, w_mean, 0.5)
    raw = x_mean.sqrt() / w_mean.sqrt()
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert torch.allclose(awq_scales(x_mean, w_mean, 0.0) * w_mean, torch.full((4,), 1.0) *
                          (awq_scales(x_mean, w_mean, 0.0) * w_mean)[0])   # alpha 0: s ~ 1 / w_mean


def test_weight_salience_is_group_normalised_mean():
    w = torch.tensor([[1.0, -2.0, 4.0, 0.0], [0.5, 0.5, -1.0, 1.0]])
    got = weight_salience([w], group_size=2)
    expected = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).mean(0)
    assert torch.allclose(got, expected)


def test_fold_into_norm_and_linear_is_exact(stories):
    model, _ = stories
    block = copy.deepcopy(model.model.layers[1])
    x = torch.randn(2, 16, 64)
    pos = torch.arange(16).unsqueeze(0)
    emb = model.model.rotary_emb(x, pos)
    reference = block(x, position_embeddings=emb, position_ids=pos)
    s = torch.rand(64) + 0.5
    attn = block.self_attn
    assert can_fold(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
    fold_scales(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
    s2 = torch.rand(172) + 0.5
    fold_scales(block.mlp.up_proj, [block.mlp.down_proj], s2)
    assert torch.allclose(block(x, position_embeddings=emb, position_ids=pos), reference, atol=1e-5)
    # GQA: v_proj (32 outputs) cannot take o_proj's 64 input scales.
    assert not can_fold(attn.v_proj, [attn.o_proj])


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.02
    w[:, 5] *= 20                                       # outlier weights: clipping should pay off
    x = torch.randn(512, 128)
    grid = IntGrid(4, 32, False)
    bound = clip_ranges(w, x, grid)
    clipped = grid.quantize(apply_clip(w, bound, 32)).dequantize()
    plain = grid.quantize(w).dequantize()
    err_clip = ((x @ clipped.t() - x @ w.t()) ** 2).reshape(512, 48).mean(0)
    err_plain = ((x @ plain.t() - x @ w.t()) ** 2).reshape(512, 48).mean(0)
    assert bool((bound <= w.abs().reshape(48, 4, 32).amax(-1) + 1e-7).all())
    assert err_clip.sum() <= err_plain.sum() + 1e-9
    assert err_clip.sum() < 0.99 * err_plain.sum()


def test_clip_ranges_handles_a_short_last_group():
    torch.manual_seed(1)
    w = torch.randn(16, 172)
    bound = clip_ranges(w, torch.randn(64, 172), IntGrid(4, 32, False))
    assert bound.shape == (16, 6)
    assert apply_clip(w, bound, 32).shape == (16, 172)


class NormLinear(nn.Module):
    """RMSNorm-like scaling then a Linear: the smallest thing AWQ can fold scales into."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.norm = nn.LayerNorm(k, elementwise_affine=True, bias=False)
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(self.norm(x))


def test_awq_scaling_reduces_error_with_salient_channels():
    """Activation outliers in a few channels: AWQ's scaled rounding beats plain RTN on the same grid."""
    from lowbit.calibration.capture import BlockCall
    from lowbit.methods.awq import AWQ
    from lowbit.methods.base import QuantizeConfig
    from lowbit.models.adapters import ArchAdapter, ScaleGroup

    torch.manual_seed(2)
    k, n = 128, 64
    module = NormLinear(k, n)
    with torch.no_grad():
        module.norm.weight.copy_(torch.ones(k))
        module.norm.weight[:6] = 30.0                     # salient channels
        module.proj.weight.copy_(torch.randn(n, k) * 0.05)
    adapter = ArchAdapter(family="toy", model_types=(), hf_classes=(), blocks_path="", embed_path="",
                          final_norm_path="", lm_head_path="", sequential=(("proj",),),
                          scale_groups=(ScaleGroup("norm", ("proj",), "proj"),))
    x = torch.randn(8, 32, k)
    calls = [BlockCall((x[i:i + 1],), {}) for i in range(8)]
    reference = module(x)
    rtn = copy.deepcopy(module)
    grid = IntGrid(4, 32, False)
    with torch.no_grad():
        rtn.proj.weight.copy_(grid.quantize(rtn.proj.weight).dequantize())
    awq_module = copy.deepcopy(module)
    method = AWQ(QuantizeConfig(method="awq", bits=4, group_size=32, options={"clip": False}))
    result = method.quantize_block(awq_module, {"proj": awq_module.proj}, calls, arch=adapter)
    result.install(awq_module)
    assert result.reports["proj"].alpha > 0          # a non-trivial scale was chosen
    err_awq = (awq_module(x) - reference).pow(2).mean()
    err_rtn = (rtn(x) - reference).pow(2).mean()
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


@pytest.fixture(scope="module")
def stories_split(stories, tinystories_text):
    from lowbit.calibration.text import tokenize_for_calibration
    from lowbit.eval.perplexity import read_text

    _, tok = stories
    tokens = tokenize_for_calibration(tok, read_text(tinystories_text)[:200_000])
    return tokens[:-8192], tokens[-4096:]


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_perplexity_better_than_rtn_on_stories(stories_dir, stories_split, bits):
    from lowbit.calibration.text import sample_windows
    from lowbit.eval.perplexity import evaluate_quality
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    calib = sample_windows(stories_split[0], 8, 256, seed=0)
    ppl = {}
    for method in ("rtn", "awq"):
        model, _ = load_model(stories_dir)
        # Same grid: asymmetric (AWQ's zero point), group 32.
        quantize_model(model, QuantizeConfig(method=method, bits=bits, group_size=32, symmetric=False),
                       calibration=calib, progress=False)
        ppl[method] = evaluate_quality(model, stories_split[1], ctx=256, progress=False).perplexity
    assert ppl["awq"] < ppl["rtn"], ppl


def test_awq_rejects_unknown_option():
    from lowbit.errors import LowbitError
    from lowbit.methods.base import QuantizeConfig, get_method

    with pytest.raises(LowbitError, match="unknown options"):
        get_method(QuantizeConfig(method="awq", options={"desc_act": True}))


def test_inspected_inputs_average_every_token_but_keep_only_the_search_budget():
    from lowbit.methods.awq import InspectedInputs

    torch.manual_seed(3)
    calls = [torch.randn(2, 100, 16) for _ in range(5)]        # 5 calls of 200 tokens
    seen = InspectedInputs(budget=300)
    for x in calls:
        seen.add("mlp", (x,), {})
    everything = torch.cat([x.reshape(-1, 16) for x in calls])
    assert torch.allclose(seen.abs_mean(), everything.abs().mean(0), rtol=1e-6)
    assert len(seen.search_calls) == 2                            # 400 tokens >= 300: two calls
    assert all(args[0] is x for (args, _), x in zip(seen.search_calls, calls))
    one = InspectedInputs(budget=10)
    one.add("mlp", (), {"hidden_states": calls[0]})
    one.add("mlp", (), {"hidden_states": calls[1]})
    assert len(one.search_calls) == 1                             # at least one call, however small the budget


def test_alpha_search_refine_finds_the_grid_minimum_of_unimodal_losses_in_fewer_passes():
    from lowbit.methods.awq import search_alpha_grid

    for n_grid in (1, 2, 5, 20):
        for minimum in range(n_grid):
            calls = {"grid": 0, "refine": 0}

            def counted(mode):
                def loss(step):
                    calls[mode] += 1
                    return (step - minimum) ** 2 + 0.5 * step
                return loss
            grid = search_alpha_grid(n_grid, "grid", counted("grid"))
            refine = search_alpha_grid(n_grid, "refine", counted("refine"))
            assert refine == grid, (n_grid, minimum)
            assert calls["grid"] == n_grid
            if n_grid == 20:
                assert calls["refine"] <= 9   # 5 coarse points, then at most 2 neighbours per halving


def test_alpha_search_ties_go_to_the_smaller_step_and_bad_settings_are_errors():
    from lowbit.errors import LowbitError
    from lowbit.methods.awq import search_alpha_grid

    assert search_alpha_grid(20, "grid", lambda step: 1.0) == (0, 1.0)
    assert search_alpha_grid(20, "refine", lambda step: 1.0) == (0, 1.0)
    with pytest.raises(LowbitError, match="alpha_grid"):
        search_alpha_grid(0, "grid", lambda step: 1.0)


def test_awq_alpha_search_option_is_checked():
    from lowbit.errors import LowbitError
    from lowbit.methods.awq import AWQ
    from lowbit.methods.base import QuantizeConfig

    method = AWQ(QuantizeConfig(method="awq", options={"alpha_search": "exhaustive"}))
    with pytest.raises(LowbitError, match="alpha_search must be one of refine, grid"):
        method.quantize_block(torch.nn.Module(), {}, inputs=[])
