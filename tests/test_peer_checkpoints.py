"""Checkpoints written by other tools load in lowbit and compute what those tools compute.

tests/data/gptqmodel-stories260k-gptq4 is GPTQModel 7.6.0's 4-bit, group 128, asymmetric, act-order (static
groups) GPTQ checkpoint of stories260K, with GPTQModel's own dequantized-weight figures and logits beside it;
`python bench/bench_gptq_peers.py --make-fixture tests/data/gptqmodel-stories260k-gptq4` rewrites it (needs the
peer venv). It has what lowbit's own writer never produces: widths padded to whole 32-bit words (172 inputs
in 22 words) and v1 zero points of 0, stored by borrowing from the neighbouring value.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.formats.gptq import pack_columns, unpack_columns, v1_stored_zeros
from lowbit.runtime.surgery import quantized_modules

FIXTURE = Path(__file__).parent / "data" / "gptqmodel-stories260k-gptq4"
ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = Path(os.environ.get("LOWBIT_PEER_VENV", "/work/peers/venv"))


@pytest.fixture(scope="module")
def peer_model():
    return lowbit.load(FIXTURE / "checkpoint")


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "peer_reference.safetensors")


def test_fixture_has_the_cases_lowbit_does_not_write():
    tensors = load_file(FIXTURE / "checkpoint" / "model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.qweight"].shape == (22, 64) and tensors[f"{down}.g_idx"].shape == (172,)
    borrowed = sum(int((unpack_columns(v, 4, v.shape[1] * 8) == 15).sum())
                   for k, v in tensors.items() if k.endswith(".qzeros"))
    assert borrowed > 0, "the fixture should hold v1 zero points of 0 (stored as 15 with a borrow)"


def test_gptqmodel_checkpoint_dequantizes_exactly_as_gptqmodel(peer_model, reference):
    layers = dict(quantized_modules(peer_model))
    assert len(layers) == 35      # 5 blocks x 7 Linears; lm_head (tied embedding) stays float
    for name, module in layers.items():
        weight = module.qweight.dequantize().double()
        assert torch.equal(weight[:8, :8], reference[f"{name}.weight_corner"]), name
        assert weight.sum().item() == pytest.approx(reference[f"{name}.weight_sum"].item(), rel=1e-12, abs=1e-9)
        assert (weight * weight).sum().item() == pytest.approx(reference[f"{name}.weight_sq_sum"].item(), rel=1e-12)


def test_gptqmodel_checkpoint_logits_match_gptqmodel(peer_model, reference):
    """GPTQModel's reference logits ran in fp16 (its CPU kernel's precision), lowbit's in fp32: same argmax,
    differences at fp16's scale."""
    with torch.no_grad():
        logits = peer_model(reference["tokens"].unsqueeze(0)).logits[0]
    peer = reference["logits"]
    assert torch.equal(logits.argmax(-1), peer.argmax(-1))
    assert (logits - peer).abs().max().item() < 0.02 * peer.abs().max().item()


def test_v1_zero_points_of_zero_round_trip_through_word_arithmetic():
    """GPTQModel writes v1 qzeros as packed(zeros) - 0x11111111 per int32 word (a zero of 0 borrows from the
    next value); reading adds the pattern back word by word and recovers every zero."""
    zeros = torch.tensor([[0, 5, 15, 0, 1, 0, 0, 7], [3, 0, 2, 0, 14, 15, 0, 0]])
    packed = pack_columns(zeros, 4).to(torch.int64) & 0xFFFFFFFF
    stored = (packed - 0x11111111) % 2 ** 32
    stored = torch.where(stored >= 2 ** 31, stored - 2 ** 32, stored).to(torch.int32)
    assert torch.equal(v1_stored_zeros(stored, 4, 8), zeros)
    # where no zero is 0 (AutoGPTQ, lowbit), the word arithmetic is the per-value minus one
    plain = zeros.clamp(min=1)
    assert torch.equal(v1_stored_zeros(pack_columns(plain - 1, 4), 4, 8), plain)


def test_v1_three_bit_zero_points_shift_per_value():
    zeros = torch.randint(0, 8, (2, 32))
    stored = pack_columns((zeros - 1) % 8, 3)
    assert torch.equal(v1_stored_zeros(stored, 3, 32), zeros)


def test_padded_widths_beyond_one_word_are_rejected():
    from lowbit.errors import CorruptFile
    from lowbit.formats.gptq import layer_from_gptq

    parts = load_file(FIXTURE / "checkpoint" / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj."
    layer = {k[len(prefix):]: v for k, v in parts.items() if k.startswith(prefix)}
    assert layer_from_gptq("down", layer, 4, 128, False, (64, 172)).shape == (64, 172)
    with pytest.raises(CorruptFile, match="do not fit"):
        layer_from_gptq("down", layer, 4, 128, False, (64, 160))


@pytest.mark.slow
def test_peer_comparison_smoke(tmp_path):
    """bench/bench_gptq_peers.py end to end on stories260K (GPTQ), when the peer venv exists."""
    if not (PEER_VENV / "bin" / "python").exists():
        pytest.skip(f"no GPTQModel peer venv at {PEER_VENV} (see bench/bench_gptq_peers.py)")
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gptq_peers.py"), "--models", "stories",
                           "--methods", "gptq", "--calib-samples", "8", "--wiki-tokens", "2048",
                           "--workdir", str(tmp_path), "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    lowbit_row, peer_row = [r for r in rows if r["method"] == "gptq"]
    assert peer_row["loaded_by_lowbit"] and peer_row["tool"].startswith("gptqmodel")
    assert peer_row["ppl_wikitext2"] == pytest.approx(lowbit_row["ppl_wikitext2"], rel=0.15)


@pytest.mark.slow
def test_gptqmodel_reads_lowbits_gptq_checkpoint(tmp_path, stories_dir, tinystories_text):
    """The other direction: GPTQModel loads lowbit's GPTQ v1 checkpoint and dequantizes it to lowbit's weights.
    (stories260K's MLP width 172 does not fill whole words, which lowbit's writer refuses, so the MLP stays float.)"""
    if not (PEER_VENV / "bin" / "python").exists():
        pytest.skip(f"no GPTQModel peer venv at {PEER_VENV} (see bench/bench_gptq_peers.py)")
    from lowbit.calibration.text import calibration_from_file
    from lowbit.methods.base import QuantizeConfig

    model = lowbit.load(stories_dir)
    config = QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=True, skip=("lm_head", "mlp"))
    lowbit.quantize(model, config, calibration=calibration_from_file(model.tokenizer, tinystories_text, 8, 256),
                    progress=False)
    lowbit.save(model, tmp_path / "ckpt", format="gptq")
    tokens = list(range(1, 33))
    spec = {"checkpoint": str(tmp_path / "ckpt"), "tokens": tokens, "out": str(tmp_path / "ref.safetensors")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(PEER_VENV / "bin" / "python"), str(ROOT / "bench" / "bench_gptq_peers.py"), "--child",
                           "peer-reference", json.dumps(spec)], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1", GPTQMODEL_CPU_WORKERS="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = load_file(spec["out"])
    layers = dict(quantized_modules(model))
    assert len(layers) == 20 and sum(k.endswith(".weight_sum") for k in reference) == 20
    for name, module in layers.items():
        assert torch.equal(module.qweight.dequantize().double()[:8, :8], reference[f"{name}.weight_corner"]), name
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    assert torch.equal(logits.argmax(-1), reference["logits"].argmax(-1))
