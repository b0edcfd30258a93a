"""GPTQ v1 and AWQ GEMM checkpoints: packing against straightforward re-implementations of the reference
loops (AutoGPTQ's qlinear pack, AutoAWQ's GEMM pack), files written by "other tools" (crafted from the format
spec, since GPTQModel/AutoAWQ do not install beside torch 2.13 here), and lowbit's own round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import CorruptFile, LowbitError
from lowbit.formats.awq import AWQ_ORDER, pack_awq, unpack_awq
from lowbit.formats.gptq import pack_columns, pack_rows, unpack_columns, unpack_rows
from lowbit.schemes.intgrid import IntGrid


# -- independent oracles, written from the reference tools' loops ---------------------------------------------
def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's row packing loop (qlinear_cuda_old.pack), uint32 [K, N] -> [K*b/32, N]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's WQLinear_GEMM packing loop, uint [K, N] -> int32 [K, N/8]."""
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << (i * 4)
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_matches_autogptq_loop_and_unpacks_exactly(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2 ** bits, (64, 24), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert np.array_equal(packed.numpy(), autogptq_pack_rows(values.numpy(), bits))
    assert torch.equal(unpack_rows(packed, bits, 64), values.to(torch.uint8))
    # qzeros are packed along N the same way.
    zeros = torch.randint(0, 2 ** bits, (3, 64), generator=g)
    assert torch.equal(unpack_columns(pack_columns(zeros, bits), bits, 64), zeros.to(torch.uint8))
    assert np.array_equal(pack_columns(zeros, bits).numpy(), autogptq_pack_rows(zeros.numpy().T, bits).T)


def test_symmetric_4bit_qzeros_are_0x77777777():
    from lowbit.formats.gptq import gptq_layer_tensors

    w = torch.randn(64, 128)
    qw = IntGrid(4, 32, True).quantize(w)
    tensors = gptq_layer_tensors("x", qw)
    assert tensors["qzeros"].shape == (4, 8)
    assert bool((tensors["qzeros"].view(torch.int32) == 0x77777777).all())
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (4, 64)
    assert torch.equal(tensors["g_idx"], (torch.arange(128) // 32).to(torch.int32))


def test_awq_pack_interleave_and_round_trip():
    # Columns 0..7 holding the values 0..7: nibble i carries column ORDER[i].
    word = pack_awq(torch.arange(8).view(1, 8))
    assert word.item() == 0x75316420
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (32, 64), generator=g)
    packed = pack_awq(values)
    assert np.array_equal(packed.numpy(), autoawq_pack(values.numpy()))
    assert torch.equal(unpack_awq(packed), values.to(torch.uint8))


def test_gptq_dequantization_formula_through_g_idx():
    """W[n,k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1)) on what lowbit writes."""
    from lowbit.formats.gptq import gptq_layer_tensors, layer_from_gptq
    from lowbit.methods.gptq import gptq_quantize

    torch.manual_seed(3)
    x = torch.randn(2048, 64) @ torch.randn(64, 64)
    w = torch.randn(32, 64)
    qw, _ = gptq_quantize(w, 2 * x.t() @ x / 2048, IntGrid(3, 16, False), desc_act=True)
    t = gptq_layer_tensors("layer", qw)
    q = unpack_rows(t["qweight"], 3, 64).long()                       # [K, N]
    z = unpack_columns(t["qzeros"], 3, 32).long() + 1                 # [G, N]
    gi = t["g_idx"].long()
    manual = (t["scales"].float()[gi] * (q - z[gi])).t()
    assert torch.equal(manual, qw.dequantize())
    back = layer_from_gptq("layer", t, bits=3, group_size=16, sym=False, shape=(32, 64))
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.g_idx, qw.g_idx)


def test_gptq_v1_cannot_store_zero_point_zero():
    from lowbit.formats.gptq import gptq_layer_tensors

    w = torch.rand(8, 32) + 0.1                                       # all positive: asymmetric zero = 0
    qw = IntGrid(4, 32, False).quantize(w)
    assert bool((qw.zeros == 0).any())
    with pytest.raises(LowbitError, match="zero points of 0"):
        gptq_layer_tensors("pos", qw)


def test_awq_rejects_other_bits_and_act_order():
    from lowbit.formats.awq import awq_layer_tensors

    with pytest.raises(LowbitError, match="4-bit only"):
        awq_layer_tensors("l", IntGrid(3, 32, False).quantize(torch.randn(8, 64)))
    qw = IntGrid(4, 32, False).quantize(torch.randn(8, 64))
    qw.g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    with pytest.raises(LowbitError, match="act-order"):
        awq_layer_tensors("l", qw)


# -- whole checkpoints -----------------------------------------------------------------------------------------
def tiny_llama(tmp_path):
    """A random Llama whose widths all pack (multiples of 32), saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("fmt,method,symmetric,options", [
    ("gptq", "gptq", True, {"desc_act": True}),
    ("gptq", "gptq", False, {}),
    ("gptq", "rtn", True, {}),
    ("awq", "awq", False, {}),
    ("awq", "awq", True, {"zero_point": False}),
])
def test_round_trip_identical_logits(tmp_path, fmt, method, symmetric, options):
    from lowbit.api import save
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, folder = tiny_llama(tmp_path)
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    config = QuantizeConfig(method=method, bits=4, group_size=32, symmetric=symmetric, options=options)
    quantize_model(model, config, calibration=calib, progress=False)
    out = save(model, tmp_path / "out", format=fmt)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == 32
    if fmt == "gptq":
        assert json.loads((out / "quantize_config.json").read_text()) == qc
        assert qc["sym"] is symmetric and qc["checkpoint_format"] == "gptq"
        # what the run used: GPTQ's defaults are act-order with static groups; RTN codes have neither
        assert qc["desc_act"] is bool(options.get("desc_act", method == "gptq"))
        assert qc["static_groups"] is (method == "gptq")
    else:
        assert qc["version"] == "gemm" and qc["zero_point"] is (not symmetric)
    loaded, _ = load_model(out)
    assert (loaded.lowbit_config.bits, loaded.lowbit_config.group_size) == (4, 32)
    assert loaded.lowbit_config.symmetric is symmetric
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".out.*"))                          # no temporary folder left behind


def test_stories_gptq_round_trip_with_unquantized_mlp(stories_dir, tmp_path):
    """stories260K's MLP width 172 cannot be packed: skipped layers are stored in float and listed in config."""
    from lowbit.api import save
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, tok = load_model(stories_dir)
    calib = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, QuantizeConfig(method="gptq", bits=3, group_size=32, symmetric=False,
                                         skip=("lm_head", "mlp")), calibration=calib, progress=False)
    out = save(model, tmp_path / "g", format="gptq", tokenizer=tok)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert any("down_proj" in key for key in qc["dynamic"])
    loaded, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(loaded(calib).logits, model(calib).logits)


def test_unpackable_width_gives_clear_error(stories_dir, tmp_path):
    from lowbit.api import save
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, tok = load_model(stories_dir)
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    with pytest.raises(LowbitError, match="172"):
        save(model, tmp_path / "bad", format="gptq", tokenizer=tok)
    assert not (tmp_path / "bad").exists()


def write_external_checkpoint(model, folder, fmt: str, bits: int = 4, group: int = 32, act_order: bool = False,
                              v2: bool = False):
    """A checkpoint laid out as AutoGPTQ / AutoAWQ write them, built with the reference loops above, in fp16.

    Returns the dequantized weights [N, K] the file stands for, per layer.
    """
    g = torch.Generator().manual_seed(5)
    tensors, expected = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = module.weight.shape
        q = torch.randint(0, 2 ** bits, (k, n), generator=g)
        groups = k // group
        zeros = torch.randint(1, 2 ** bits, (groups, n), generator=g)
        scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
        g_idx = torch.randperm(k, generator=g) // group if act_order else torch.arange(k) // group
        expected[name] = (scales.float()[g_idx] * (q - zeros[g_idx])).t()
        if fmt == "gptq":
            stored_zeros = zeros if v2 else zeros - 1
            tensors[f"{name}.qweight"] = torch.from_numpy(autogptq_pack_rows(q.numpy(), bits))
            tensors[f"{name}.qzeros"] = torch.from_numpy(autogptq_pack_rows(stored_zeros.numpy().T, bits).T.copy())
            tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        else:
            tensors[f"{name}.qweight"] = torch.from_numpy(autoawq_pack(q.numpy()))
            tensors[f"{name}.qzeros"] = torch.from_numpy(autoawq_pack(zeros.numpy()))
        tensors[f"{name}.scales"] = scales
    for key, value in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in expected) and key != "lm_head.weight":
            tensors[key] = value.half()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = model.config.to_dict()
    if fmt == "gptq":
        cfg["quantization_config"] = {"bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
                                      "quant_method": "gptq", "checkpoint_format": "gptq_v2" if v2 else "gptq",
                                      "damp_percent": 0.1, "static_groups": False, "true_sequential": True}
    else:
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    return expected


@pytest.mark.parametrize("fmt,act_order,v2", [("gptq", False, False), ("gptq", True, False), ("gptq", False, True),
                                              ("awq", False, False)])
def test_loads_checkpoints_laid_out_by_other_tools(tmp_path, fmt, act_order, v2):
    from lowbit.models.loading import load_model
    from lowbit.runtime.qlinear import QuantLinear

    model, _ = tiny_llama(tmp_path)
    model.config.tie_word_embeddings = True
    expected = write_external_checkpoint(model, tmp_path / "ext", fmt, act_order=act_order, v2=v2)
    loaded, _ = load_model(tmp_path / "ext")
    for name, weight in expected.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, QuantLinear)
        assert torch.equal(module.qweight.dequantize(), weight), name
    with torch.no_grad():
        logits = loaded(torch.arange(16).view(1, 16)).logits
    assert torch.isfinite(logits).all()


def test_corrupt_checkpoint_is_reported(tmp_path):
    from lowbit.models.loading import load_model

    model, _ = tiny_llama(tmp_path)
    write_external_checkpoint(model, tmp_path / "ext", "gptq")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ext" / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.qzeros"]
    save_file(tensors, str(tmp_path / "ext" / "model.safetensors"))
    with pytest.raises(CorruptFile, match="qzeros"):
        load_model(tmp_path / "ext")
    (tmp_path / "ext" / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CorruptFile, match="truncated or corrupt"):
        load_model(tmp_path / "ext")


def test_only_the_folders_weight_files_are_read(tmp_path):
    """A stray safetensors file (Mistral's consolidated.safetensors, an adapter) next to the weights is not read;
    sharded folders read what their index lists, and a listed shard that is missing is named."""
    from lowbit.formats.hf_quantized import read_tensors, weight_files

    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    save_file({"a": torch.zeros(2), "extra": torch.zeros(3)}, str(tmp_path / "consolidated.safetensors"))
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert set(read_tensors(tmp_path)) == {"a"} and read_tensors(tmp_path)["a"].sum() == 2

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(2)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(3)}, str(sharded / "model-00002-of-00002.safetensors"))
    save_file({"a": torch.zeros(2)}, str(sharded / "consolidated.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_tensors(sharded)
    assert set(tensors) == {"a", "b"} and tensors["a"].sum() == 2
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptFile, match="model-00002-of-00002.safetensors"):
        read_tensors(sharded)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_unpacked_from_words_transposed_equal_the_unpacked_rows(bits):
    """A Linear's codes come from its qweight by one transposing copy of the words and lowbit's own unpack (the
    words' little-endian bytes are the column's bit stream): the very codes unpack_rows gives, padded rows too."""
    from lowbit.formats.gptq import unpack_rows_transposed

    rows = {2: 80, 3: 96, 4: 72, 8: 68}[bits]    # whole words, not multiples of 32 rows (GPTQModel's padded widths)
    codes = torch.randint(0, 2 ** bits, (rows, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    words = pack_rows(codes, bits)
    assert torch.equal(unpack_rows_transposed(words, bits, rows), unpack_rows(words, bits, rows).t())
    assert torch.equal(unpack_rows_transposed(words, bits, rows), codes.t())
