"""`lowbit inspect` reads headers only: the same facts as loading the model, without torch and in constant
memory."""
import json
import subprocess
import sys

import pytest

from arch_models import MODEL_TYPES
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


# -- hyper-parameters against tensors, headers only (issue 13) ----------------------------------------------------
def _inspect_error(capsys, path) -> str:
    """`lowbit inspect PATH` exits 2 with one `lowbit: error:` line and no traceback; that line."""
    assert main(["-q", "inspect", str(path)]) == 2
    err = capsys.readouterr()[1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name,shape,type_name", [
    ("blk.0.attn_output.weight", (65536, 64), "Q8_0"),     # the probe's crash: 65,536 outputs, data appended
    ("blk.0.attn_q.weight", (64, 262144), "Q8_0"),         # and 262,144 inputs
    ("blk.1.ffn_down.weight", (64, 344), "F32"),
    ("blk.2.attn_k.weight", (64, 64), "Q8_0"),             # kv heads x head size is 32
    ("token_embd.weight", (512, 128), "Q8_0"),
    ("blk.4.ffn_norm.weight", (128,), "F32"),
])
def test_inspect_refuses_gguf_tensors_the_hyper_parameters_do_not_give(quantized_outputs, tmp_path, capsys, name,
                                                                        shape, type_name):
    import fuzzing

    src = quantized_outputs["q8.gguf"]
    bad = fuzzing.rewrite_gguf(src, tmp_path / "bad.gguf", replace={name: fuzzing.float_tensor(name, shape, 0,
                                                                                                  type_name)})
    line = _inspect_error(capsys, bad)
    assert f"tensor {name} has shape {list(shape)}" in line and "hyper-parameters" in line


@pytest.mark.parametrize("key,value,words", [
    ("llama.block_count", 4, "tensors blk.4.* are beyond block_count 4"),
    ("llama.block_count", 6, "no tensors blk.5.*"),
    ("llama.embedding_length", 128, "attn_k.weight has shape [32, 64]"),
    ("llama.feed_forward_length", 171, "ffn_down.weight has shape [64, 172]"),
    ("llama.attention.head_count_kv", 8, "attn_k.weight has shape [32, 64]"),
    ("llama.attention.head_count", 4, "attn_k.weight has shape [32, 64]"),   # head size 16: k rows 64
    ("llama.attention.head_count", 3, "not a multiple of 4 key-value heads"),
    ("llama.attention.head_count", 0, "outside 1.."),
    ("llama.block_count", 0, "outside 1.."),
])
def test_inspect_refuses_gguf_metadata_the_tensors_disagree_with(quantized_outputs, tmp_path, capsys, key, value,
                                                                 words):
    import fuzzing

    bad = fuzzing.rewrite_gguf(quantized_outputs["q8.gguf"], tmp_path / "bad.gguf", meta={key: value})
    assert words in _inspect_error(capsys, bad)


def test_absurd_hyper_parameters_are_refused_at_once_in_little_memory(quantized_outputs, tmp_path):
    """Every bounded GGUF key set to 0, 2**31 and 2**32 - 1, and config.json keys set to 10**12: each `lowbit
    inspect` exits 2 at once, in a process that stays small (nothing is counted to or allocated by the value)."""
    import shutil

    import fuzzing
    from lowbit.formats.gguf import read_gguf
    from lowbit.models.validate import GGUF_HPARAM_KEYS

    src = quantized_outputs["q8.gguf"]
    keys = [k for k in read_gguf(src).metadata if k.startswith("llama.") and k[6:] in GGUF_HPARAM_KEYS]
    assert "llama.block_count" in keys and len(keys) >= 6
    paths = [fuzzing.rewrite_gguf(src, tmp_path / f"{k}-{v}.gguf", meta={k: v})
             for k in keys for v in (0, 2 ** 31, 2 ** 32 - 1)]
    config = json.loads((quantized_outputs["native"] / "config.json").read_text())
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
        folder = tmp_path / f"native-{key}"
        shutil.copytree(quantized_outputs["native"], folder)
        (folder / "config.json").write_text(json.dumps({**config, key: 10 ** 12}))
        paths.append(folder)
    # VmHWM: the child's own peak (ru_maxrss would carry the forking pytest process's over exec)
    script = ("import json, re, sys, time; from lowbit.cli import main\n"
              "out = []\n"
              "for p in sys.argv[1:]:\n"
              "    t = time.perf_counter(); code = main(['-q', 'inspect', p])\n"
              "    out.append((code, time.perf_counter() - t))\n"
              "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "print(json.dumps({'runs': out, 'rss_mb': peak / 1024}))")
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("lowbit: error:")]
    assert [code for code, _ in report["runs"]] == [2] * len(paths) and len(errors) == len(paths)
    assert "Traceback" not in done.stderr
    assert max(seconds for _, seconds in report["runs"]) < 2.0 and report["rss_mb"] < 200, report


@pytest.mark.parametrize("kind", ["native", "gptq"])
@pytest.mark.parametrize("key,value,words", [
    ("num_hidden_layers", 4, "tensors of layer 4"),
    ("num_hidden_layers", 6, "no tensors for layer 5"),
    ("num_key_value_heads", 8, "k_proj.weight has shape [32, 64]"),
    ("num_attention_heads", 4, "o_proj.weight has shape [64, 64]"),      # 4 heads of head_dim 8: 32 inputs
    ("head_dim", 16, "k_proj.weight has shape [32, 64]"),
    ("intermediate_size", 128, "down_proj.weight has shape [64, 172]"),
    ("vocab_size", 1024, "embed_tokens.weight has shape [512, 64]"),
    ("hidden_size", 32, "has shape"),
    ("num_attention_heads", "8", "not an integer"),
])
def test_inspect_refuses_folders_whose_config_disagrees_with_the_weights(quantized_outputs, tmp_path, capsys, kind,
                                                                        key, value, words):
    import shutil

    folder = tmp_path / kind
    shutil.copytree(quantized_outputs[kind], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    assert words in _inspect_error(capsys, folder)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_role_shapes_are_the_skeletons_for_every_family(model_type):
    """The headers-only shapes (llama.cpp roles from the metadata, Hugging Face names from config.json) equal those
    of the transformers skeleton the loaders check files against, for every family: no valid file is refused, and
    a misshapen one is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from arch_models import COMMON, TINY
    from lowbit.errors import CorruptFile
    from lowbit.models.arch import architecture_for
    from lowbit.models.gguf_import import expected_gguf_tensors
    from lowbit.models.validate import check_folder_header, gguf_expected_shapes, hf_role

    config = AutoConfig.for_model(model_type, **COMMON, **TINY[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch = architecture_for(model)
    arch.prepare(model)
    hf_shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    check_folder_header(config.to_dict(), hf_shapes, "skeleton")
    checked = [n for n in hf_shapes if hf_role(n)]
    if model_type in ("llama", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe"):
        assert len(checked) >= 2 + 4 * config.num_hidden_layers
        victim = next(n for n in checked if "o_proj" in n)
        with pytest.raises(CorruptFile, match="o_proj"):
            check_folder_header(config.to_dict(), {**hf_shapes, victim: (hf_shapes[victim][0] * 2,
                                                                         hf_shapes[victim][1])}, "skeleton")
    if arch.gguf is None:
        return
    try:
        hparams = arch.gguf.hparams(config)
    except Exception as exc:  # noqa: BLE001 (families llama.cpp cannot hold with this config)
        pytest.skip(f"no GGUF for this config: {exc}")
    meta = {"general.architecture": arch.gguf.name, **{f"{arch.gguf.name}.{k}": v for k, v in hparams.items()}}
    skeleton = expected_gguf_tensors(model, arch)
    assert gguf_expected_shapes(meta, skeleton, "skeleton") == skeleton


def test_projected_embeddings_are_not_refused():
    """OPT-350m's embedding and head are word_embed_proj_dim (512) wide, not hidden_size (1024): the headers check
    takes their width from word_embed_proj_dim, and still refuses a head of another width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from arch_models import COMMON, TINY
    from lowbit.errors import CorruptFile
    from lowbit.models.validate import check_folder_header

    config = AutoConfig.for_model("opt", **COMMON, **{**TINY["opt"], "word_embed_proj_dim": 32})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert shapes["lm_head.weight"] == (96, 32) and config.hidden_size == 64
    check_folder_header(config.to_dict(), shapes, "skeleton")
    with pytest.raises(CorruptFile, match=r"lm_head.weight has shape \[96, 64\].*need \[96, 32\]"):
        check_folder_header(config.to_dict(), {**shapes, "lm_head.weight": (96, 64)}, "skeleton")


@pytest.mark.parametrize("vision_layers", [1, 3])
def test_multimodal_towers_are_not_checked_against_the_text_config(vision_layers):
    """A Gemma 3 checkpoint's vision tower has its own widths (SigLIP q_proj [1152, 1152] beside a text attn_q of
    [2048, 2560]) and layer count: the headers check reads the language model's tensors only, and still refuses a
    misshapen one of those."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from lowbit.errors import CorruptFile
    from lowbit.models.validate import check_folder_header

    config = Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=300),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=vision_layers,
                           num_attention_heads=4, image_size=32, patch_size=16), mm_tokens_per_image=4)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert any("vision" in n and n.endswith("q_proj.weight") and shapes[n] == (48, 48) for n in shapes)
    check_folder_header(config.to_dict(), shapes, "gemma3")
    victim = next(n for n in shapes if "language_model" in n and n.endswith("o_proj.weight"))
    with pytest.raises(CorruptFile, match="o_proj"):
        check_folder_header(config.to_dict(), {**shapes, victim: (128, 64)}, "gemma3")


def test_counted_shared_experts_are_not_given_the_dense_width():
    """DeepSeek-V2-Lite's GGUF says expert_shared_count 2 and no shared width: its ffn_*_shexp are 2 x 1408 = 2816
    wide, not feed_forward_length (10944), so the headers check leaves that width open instead of refusing the file;
    Qwen2-MoE's shared expert without the key is still feed_forward_length wide."""
    from lowbit.models.validate import gguf_expected_shapes, shape_agrees

    meta = {"general.architecture": "deepseek2", "deepseek2.embedding_length": 2048,
            "deepseek2.attention.head_count": 16, "deepseek2.feed_forward_length": 10944,
            "deepseek2.expert_count": 64, "deepseek2.expert_feed_forward_length": 1408,
            "deepseek2.expert_shared_count": 2}
    names = ["blk.1.ffn_gate_shexp.weight", "blk.1.ffn_down_shexp.weight"]
    expected = gguf_expected_shapes(meta, names, "deepseek")
    assert shape_agrees((2816, 2048), expected[names[0]]) and shape_agrees((2048, 2816), expected[names[1]])
    qwen = {k.replace("deepseek2", "qwen2moe"): v for k, v in meta.items() if "shared_count" not in k}
    qwen["general.architecture"] = "qwen2moe"
    assert gguf_expected_shapes(qwen, names, "qwen")[names[0]] == (10944, 2048)


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_fused_gate_up_is_twice_the_intermediate_width_in_every_family(model_type):
    """gate_up_proj stacks gate and up whatever the family (GLM-4's [2 x intermediate, hidden] as Phi-3's): the
    headers check does not refuse it, and still refuses one of the intermediate width alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.errors import CorruptFile
    from lowbit.models.validate import check_folder_header

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96,
                                  pad_token_id=0, eos_token_id=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    fused = "model.layers.0.mlp.gate_up_proj.weight"
    assert shapes[fused] == (256, 64)
    check_folder_header(config.to_dict(), shapes, model_type)
    with pytest.raises(CorruptFile, match=r"gate_up_proj.weight has shape \[128, 64\].*need \[256, 64\]"):
        check_folder_header(config.to_dict(), {**shapes, fused: (128, 64)}, model_type)
