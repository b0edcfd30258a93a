"""`lowbit inspect` reads headers only: the same facts as loading the model, without torch and in constant
memory."""
import json
import subprocess
import sys

import pytest

from lowbit.cli import main


def _inspect(capsys, path, *extra):
    assert main(["-q", "inspect", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr()[0])


@pytest.fixture(scope="module")
def quantized_outputs(stories_dir, tmp_path_factory):
    """stories260K written by lowbit in several formats (GGUF Q8_0 and Q4_K_M, native RTN-4, GPTQ, bnb NF4)."""
    root = tmp_path_factory.mktemp("inspect")
    jobs = {
        "native": ["--bits", "4", "--group-size", "32"],
        "gptq": ["--method", "gptq", "--format", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "4",
                 "--calib-len", "64", "--skip", "lm_head,mlp"],
        "bnb": ["--method", "nf4", "--format", "bnb"],
        "q8.gguf": ["--format", "gguf", "--type", "Q8_0"],
    }
    outputs = {}
    for name, args in jobs.items():
        out = root / name
        assert main(["-q", "quantize", str(stories_dir), "-o", str(out), *args]) == 0
        outputs[name] = out
    return outputs


@pytest.mark.parametrize("kind", ["native", "gptq", "bnb", "q8.gguf"])
def test_headers_agree_with_the_loaded_model(quantized_outputs, stories_dir, capsys, kind):
    path = quantized_outputs[kind]
    headers = _inspect(capsys, path)
    loaded = _inspect(capsys, path, "--load")
    assert headers["parameters"] == _inspect(capsys, stories_dir)["parameters"] == 260032
    if not kind.endswith(".gguf"):       # the GGUF runtime model holds its tied head as a second module
        assert headers["parameters"] == loaded["parameters"]
    assert headers["layers"] == loaded["layers"] and headers["hidden_size"] == loaded["hidden_size"]
    assert headers["vocab_size"] == loaded["vocab_size"]
    assert headers["file_size_mb"] == loaded["file_size_mb"]
    if kind.endswith(".gguf"):           # tensors in the file; the loaded model adds the tied head's module
        tied = 1 if headers["tied_head"] else 0
        assert headers["quantization"]["quantized_tensors"] + tied == loaded["quantization"]["quantized_layers"]
    else:
        assert headers["quantization"]["quantized_layers"] == loaded["quantization"]["quantized_layers"]


def test_real_gguf_headers(smollm2_gguf, capsys):
    info = _inspect(capsys, smollm2_gguf)
    assert info["gguf_architecture"] == "llama" and info["layers"] == 30 and info["hidden_size"] == 576
    assert info["vocab_size"] == 49152 and info["tied_head"] is True
    # Q4_1 stores 32 codes of 4 bits + an fp16 scale and min per block: 4 + 32 / 32 = 5 bits; Q8_0 8.5
    assert 5.0 <= info["quantization"]["bits_per_weight"] <= 8.5


def test_inspect_imports_neither_torch_nor_transformers(quantized_outputs):
    for kind in ("native", "q8.gguf"):
        script = ("import sys; from lowbit.cli import main; code = main(['-q', 'inspect', sys.argv[1]]); "
                  "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
                  "assert code == 0 and not heavy, heavy")
        done = subprocess.run([sys.executable, "-c", script, str(quantized_outputs[kind])], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_gguf_type_table_matches_the_schemes():
    from lowbit.formats.gguf_file import QUANTIZED_TYPE_NAMES, TENSOR_TYPES
    from lowbit.schemes.ggml import CODECS

    assert set(QUANTIZED_TYPE_NAMES) == set(CODECS)
    for name, codec in CODECS.items():
        assert TENSOR_TYPES[name] == (codec.type_id, codec.block, codec.type_size)


def test_corrupt_safetensors_header_is_one_line(stories_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(stories_dir, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")          # a header longer than the file
    (broken / "model.safetensors").write_bytes(bytes(data))
    assert main(["-q", "inspect", str(broken)]) == 2
    err = capsys.readouterr()[1]
    assert "header length" in err and "Traceback" not in err
