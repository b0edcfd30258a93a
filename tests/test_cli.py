"""The command line end to end on stories260K, and every kind of bad input: one clear line, non-zero exit,
nothing half-written."""
import json
import shutil

import pytest

from lowbit.cli import main


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_inspect_generate_eval(stories_dir, tinystories_text, tmp_path, capsys):
    out = tmp_path / "q4"
    code, _, err = run(capsys, "quantize", stories_dir, "-o", out, "--bits", "4", "--group-size", "32",
                       "--asym", "--skip", "lm_head,mlp.down_proj")
    assert code == 0, err
    assert (out / "lowbit.json").is_file() and not list(tmp_path.glob(".q4*"))
    code, text, _ = run(capsys, "inspect", out, "--json", "--load")
    info = json.loads(text)
    assert info["quantization"]["bits"] == 4 and info["quantization"]["group_size"] == 32
    assert info["quantization"]["quantized_layers"] == 5 * 6
    assert info["quantization"]["bits_per_weight"] == pytest.approx(4 + 20 / 32, abs=0.01)  # fp16 scale, 4-bit zero
    assert info["parameters"] == 260032
    code, text, _ = run(capsys, "inspect", out, "--json")       # headers only: what the file stores
    headers = json.loads(text)
    assert headers["parameters"] == 260032 and headers["quantization"]["quantized_layers"] == 5 * 6
    assert headers["quantization"]["bits_per_weight"] == pytest.approx(4 + (16 + 8) / 32, abs=0.01)  # uint8 zeros
    code, text, _ = run(capsys, "generate", out, "-p", "Once upon a time", "-n", "12")
    assert code == 0 and text.startswith("Once upon a time") and len(text) > 30
    report = tmp_path / "eval.json"
    code, text, err = run(capsys, "eval", out, "--data", tinystories_text, "--max-tokens", "2048", "--ctx", "256",
                          "--base", stories_dir, "--json", report)
    assert code == 0, err
    rows = json.loads(report.read_text())["results"]
    assert rows[0]["kld"] > 0 and rows[0]["perplexity"] > rows[1]["perplexity"] * 0.95
    assert "ppl" in text and "KLD" in text


def test_sampling_is_reproducible_with_seed(stories_dir, capsys):
    args = ["generate", stories_dir, "-p", "Once upon a time", "-n", "24", "--temperature", "1.5",
            "--top-p", "0.99", "--top-k", "100", "--seed", "7"]
    assert run(capsys, *args)[1] == run(capsys, *args)[1]
    other = run(capsys, *args[:-1], "8")[1]
    assert other != run(capsys, *args)[1]


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--bits", "9"], "bits=9 is out of range"),
    (["--bits", "1"], "bits=1 is out of range"),
    (["--format", "onnx"], "unknown output format 'onnx'"),
    (["--damp", "0.01"], "method rtn: unknown options ['damp']"),
])
def test_bad_quantize_options(stories_dir, tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "quantize", stories_dir, "-o", tmp_path / "out", *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_model_and_hub_ids(tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "inspect", "meta-llama/Llama-3-8B")
    assert code == 2 and "does not download" in err


def test_truncated_weights(stories_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(stories_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "quantize", broken, "-o", tmp_path / "out")
    assert code == 2 and "truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


def test_truncated_lowbit_checkpoint(stories_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(capsys, "quantize", stories_dir, "-o", out, "--group-size", "-1")[0] == 0
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-1000])
    code, _, err = run(capsys, "generate", out, "-p", "hi", "-n", "2")
    assert code == 2 and "truncated or corrupt" in err


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "quantize", tmp_path / "bert", "-o", tmp_path / "out")
    assert code == 2 and "architecture 'bert' is not supported" in err


def _tiny_gguf(path, raw_type, row_bytes):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, row_bytes), dtype=np.uint8), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_with_unsupported_or_unknown_tensor_type(tmp_path):
    import struct

    from gguf import GGMLQuantizationType

    from lowbit.errors import CorruptFile
    from lowbit.models.gguf_import import open_gguf

    path = tmp_path / "q8k.gguf"
    _tiny_gguf(path, GGMLQuantizationType.Q8_K, 292)  # Q8_K is an intermediate type, never dequantized
    with pytest.raises(CorruptFile, match="ggml type 15, which lowbit does not know"):
        open_gguf(path)
    # A type id no GGUF version defines: patch the tensor-info type field of a valid file.
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims (u32), two u64 dims, then the u32 type
    data[at:at + 4] = struct.pack("<I", 250)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="ggml type 250, which lowbit does not know"):
        open_gguf(path)


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    code, _, err = run(capsys, "import", bad, "-o", tmp_path / "out")
    assert code == 2 and ("GGUF" in err or "gguf" in err)
    assert not (tmp_path / "out").exists()
