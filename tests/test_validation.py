"""The validation layer (lowbit/models/validate.py, the GGUF parser, the compiled step's checks): one test per
defect class a fuzz probe found, each a one-line LowbitError naming the problem where lowbit used to crash in C,
allocate without bound, drop or add layers silently, or run randomly initialised or misread weights."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch

import fuzzing
from conftest import ROOT, STORIES
from lowbit.errors import LowbitError
from lowbit.models.loading import load_model

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} (shared test model) is absent")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return fuzzing.build_originals(STORIES, tmp_path_factory.mktemp("valid"), ("gguf-q8_0", "native-rtn4", "gptq"))


def rejects(path, *words, keep_quantized=True) -> str:
    """The one-line LowbitError loading `path` gives, checked to name each of `words`."""
    with pytest.raises(LowbitError) as info:
        load_model(path, keep_quantized=keep_quantized)
    message = str(info.value)
    assert "\n" not in message.strip() and all(w in message for w in words), message
    return message


def copy_folder(src, dst, edit_file=None, edit=None):
    shutil.copytree(src, dst)
    if edit_file is not None:
        data = json.loads((dst / edit_file).read_text())
        edit(data)
        (dst / edit_file).write_text(json.dumps(data))
    return dst


# -- GGUF: tensors against the architecture ------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("blk.0.attn_output.weight", (65536, 64)),
                                        ("blk.0.attn_q.weight", (64, 262144))])
def test_gguf_tensor_of_another_shape_is_refused_before_the_kernels(made, tmp_path, name, shape):
    """Self-consistent files (data appended) whose one tensor has 65,536 outputs or 262,144 inputs: they used to
    load and crash `lowbit generate` in the compiled step (double free / SIGSEGV)."""
    bad = fuzzing.rewrite_gguf(made["gguf-q8_0"], tmp_path / "bad.gguf",
                               replace={name: fuzzing.float_tensor(name, shape, type_name="Q8_0")})
    rejects(bad, name, str(list(shape)))
    rejects(bad, name, keep_quantized=False)


@pytest.mark.parametrize("layers,named", [(4, "blk.4."), (6, "blk.5.")])
def test_gguf_block_count_must_match_the_tensors(made, tmp_path, layers, named):
    """block_count lowered or raised used to drop or add layers silently."""
    bad = fuzzing.rewrite_gguf(made["gguf-q8_0"], tmp_path / "bad.gguf", meta={"llama.block_count": layers})
    rejects(bad, named)


@pytest.mark.parametrize("key,value", [("llama.block_count", 2 ** 32 - 1), ("llama.attention.head_count", 0),
                                       ("llama.embedding_length", 2 ** 31), ("llama.context_length", 0)])
def test_gguf_absurd_hyper_parameters_fail_at_once(made, tmp_path, key, value):
    bad = fuzzing.rewrite_gguf(made["gguf-q8_0"], tmp_path / "bad.gguf", meta={key: value})
    started = time.perf_counter()
    message = rejects(bad)
    assert "outside" in message or "malformed" in message, message
    assert time.perf_counter() - started < 5      # before any skeleton of 2**32 layers is allocated


def test_gguf_missing_tensor_never_leaves_uninitialised_weights(made, tmp_path):
    bad = fuzzing.rewrite_gguf(made["gguf-q8_0"], tmp_path / "bad.gguf", drop=("blk.2.ffn_gate.weight",))
    rejects(bad, "blk.2.ffn_gate.weight", "missing")


def test_gguf_type_changed_to_a_smaller_one_is_a_gap(made, tmp_path):
    """Q8_0 -> Q4_1 in the header (fewer bytes for the same shape, still inside the file) used to load the
    tensor's bytes as Q4_1 blocks and give other logits."""
    data = bytearray(made["gguf-q8_0"].read_bytes())
    layout = fuzzing.gguf_layout(bytes(data))
    info = next(t for t in layout.tensors if t["name"] == "blk.2.attn_output.weight")
    struct.pack_into("<I", data, info["type_at"], 3)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    rejects(tmp_path / "bad.gguf", "belong to no tensor")


@pytest.mark.parametrize("edit,words", [("shift", "belong to no tensor"), ("overlap", "overlap|belong to no tensor"),
                                        ("beyond", "needs bytes"), ("misalign", "not aligned")])
def test_gguf_tensor_offsets_through_lowbit_load(made, tmp_path, edit, words):
    """Offsets shifted by an alignment step, equal to another tensor's, past the end or unaligned: `lowbit.load`
    of a GGUF used to go through a second parser that did not check them (the kept-quantized reader did)."""
    import lowbit

    data = bytearray(made["gguf-q8_0"].read_bytes())
    tensors = fuzzing.gguf_layout(bytes(data)).tensors
    target, other = tensors[3], tensors[4]
    value = {"shift": target["offset"] + 32, "overlap": other["offset"], "beyond": len(data),
             "misalign": target["offset"] + 1}[edit]
    struct.pack_into("<Q", data, target["offset_at"], value)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    for keep_quantized in (False, True):
        with pytest.raises(LowbitError, match=words):
            lowbit.load(tmp_path / "bad.gguf", keep_quantized=keep_quantized)


@pytest.mark.parametrize("type_id", [1, 3, 30])
def test_gguf_last_tensor_type_shrunk_is_refused(made, tmp_path, type_id):
    """The last tensor (output_norm.weight, F32) retyped F16, Q4_1 or BF16 in the header: fewer bytes, the rest of
    the file left over as trailing bytes. It loaded with other logits (slow fuzz run, seeds 1 and 4)."""
    data = bytearray(made["gguf-q8_0"].read_bytes())
    layout = fuzzing.gguf_layout(bytes(data))
    last = max(layout.tensors, key=lambda t: t["offset"])
    assert last["name"] == "output_norm.weight"
    struct.pack_into("<I", data, last["type_at"], type_id)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    rejects(tmp_path / "bad.gguf", "after the last tensor", "output_norm.weight")
    rejects(tmp_path / "bad.gguf", "after the last tensor", keep_quantized=False)


def test_gguf_data_appended_is_refused(made, tmp_path):
    (tmp_path / "bad.gguf").write_bytes(made["gguf-q8_0"].read_bytes() + bytes(40))
    rejects(tmp_path / "bad.gguf", "40 bytes after the last tensor")


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_gguf_counts(made, tmp_path, field):
    """n_tensors = 0 (no model) and counts larger than the file: one line, no allocation."""
    data = bytearray(made["gguf-q8_0"].read_bytes())
    layout = fuzzing.gguf_layout(bytes(data))
    for value in (0, 2 ** 64 - 1):
        struct.pack_into("<Q", data, getattr(layout, f"{field}_at"), value)
        (tmp_path / "bad.gguf").write_bytes(bytes(data))
        rejects(tmp_path / "bad.gguf")


def test_gguf_tensor_dims_cannot_overflow(made, tmp_path):
    data = bytearray(made["gguf-q8_0"].read_bytes())
    info = fuzzing.gguf_layout(bytes(data)).tensors[3]
    struct.pack_into("<Q", data, info["dims_at"][-1], 2 ** 63)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    rejects(tmp_path / "bad.gguf", info["name"])


# -- folders: configs against the weights ----------------------------------------------------------------------
@pytest.mark.parametrize("key,value,words", [
    ("num_hidden_layers", 10 ** 12, ("num_hidden_layers", "outside")),
    ("num_hidden_layers", 4, ("model.layers.4.",)),
    ("num_hidden_layers", 6, ("model.layers.5.",)),
    ("num_key_value_heads", 8, ("k_proj",)),
    ("num_attention_heads", 4, ("proj",)),
    ("intermediate_size", 176, ("mlp",)),
    ("head_dim", 16, ("proj",)),
])
@pytest.mark.parametrize("fmt", ["native-rtn4", "gptq"])
def test_config_disagreeing_with_the_weights(made, tmp_path, fmt, key, value, words):
    """Config values the tensors contradict used to give garbage with exit 0 (or a torch traceback)."""
    bad = copy_folder(made[fmt], tmp_path / "bad", "config.json", lambda c: c.update({key: value}))
    message = rejects(bad, *words)
    assert "layer" in message or "tensor" in message or key in message


def test_plain_folder_with_missing_or_extra_weights(tmp_path, stories):
    """transformers only logs missing and unexpected weights (and initialises the missing ones at random)."""
    from safetensors.torch import load_file, save_file

    for edit, word in ((lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing"),
                       (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}), "does not have")):
        folder = tmp_path / word.replace(" ", "-")
        shutil.copytree(STORIES, folder)
        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        rejects(folder, word)


def test_deleted_lowbit_json_is_not_a_float_model(made, tmp_path):
    bad = copy_folder(made["native-rtn4"], tmp_path / "bad")
    (bad / "lowbit.json").unlink()
    rejects(bad, "quantized tensors", "no quantization config")


@pytest.mark.parametrize("manifest", ["null", '{"format": "lowbit", "version": "1", "layers": {}}',
                                      '{"format": "lowbit", "version": 1, "layers": []}'])
def test_malformed_lowbit_json(made, tmp_path, manifest):
    bad = copy_folder(made["native-rtn4"], tmp_path / "bad")
    (bad / "lowbit.json").write_text(manifest)
    rejects(bad, "lowbit.json")


def test_lowbit_json_shape_or_group_size_disagreeing_with_tensors(made, tmp_path):
    name = "model.layers.0.self_attn.o_proj"
    bad = copy_folder(made["native-rtn4"], tmp_path / "shape", "lowbit.json",
                      lambda m: m["layers"][name].update(shape=[64, 128]))
    rejects(bad, name)
    bad = copy_folder(made["native-rtn4"], tmp_path / "group", "lowbit.json",
                      lambda m: m["layers"][name].update(group_size=16))
    rejects(bad, name)


@pytest.mark.parametrize("field", ["layer", "scheme"])
def test_lowbit_json_group_size_with_the_same_group_count(made, tmp_path, field):
    """Group size 32 -> 33 on 64 columns: still 2 groups, so every shape fits, but columns 32 map to another
    group's scale. The layer's edit loaded with other logits (slow fuzz run, seed 4)."""
    name = "model.layers.2.mlp.up_proj"

    def edit(manifest):
        spec = manifest["layers"][name]
        (spec if field == "layer" else spec["scheme"])["group_size"] = 33

    bad = copy_folder(made["native-rtn4"], tmp_path / "bad", "lowbit.json", edit)
    rejects(bad, name, "group size")


def test_unknown_gptq_quant_method(made, tmp_path):
    bad = copy_folder(made["gptq"], tmp_path / "bad", "config.json",
                      lambda c: c["quantization_config"].update(quant_method="gptq_v9"))
    (bad / "quantize_config.json").unlink()
    rejects(bad, "gptq_v9", "cannot read")


@pytest.mark.parametrize("key", ["bits", "group_size"])
def test_gptq_settings_missing(made, tmp_path, key):
    bad = copy_folder(made["gptq"], tmp_path / "bad", "config.json", lambda c: c["quantization_config"].pop(key))
    rejects(bad, key)


def test_gptq_tensors_stored_as_float(made, tmp_path):
    from safetensors.torch import load_file, save_file

    for part in ("qweight", "g_idx", "qzeros"):
        bad = copy_folder(made["gptq"], tmp_path / part)
        tensors = load_file(str(bad / "model.safetensors"))
        key = f"model.layers.0.self_attn.q_proj.{part}"
        tensors[key] = tensors[key].float()
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
        rejects(bad, key, "float32")


def test_gptq_settings_that_misread_the_tensors(made, tmp_path):
    """checkpoint_format gptq_v2 on a v1 file (zeros off by one) and a group size g_idx contradicts used to load
    with other weights."""
    bad = copy_folder(made["gptq"], tmp_path / "v2", "config.json",
                      lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    (bad / "quantize_config.json").unlink()
    rejects(bad, "zero points")
    bad = copy_folder(made["gptq"], tmp_path / "group", "config.json",
                      lambda c: c["quantization_config"].update(group_size=16))
    rejects(bad, "g_idx")


@pytest.mark.parametrize("text", ["{", "null", '{"model_type": "llama", "hidden_size": "64"}'])
def test_invalid_config_json(made, tmp_path, text):
    bad = copy_folder(made["native-rtn4"], tmp_path / "bad")
    (bad / "config.json").write_text(text)
    rejects(bad, "config.json")


def test_cli_exits_2_with_one_line(made, tmp_path):
    bad = copy_folder(made["native-rtn4"], tmp_path / "bad")
    (bad / "lowbit.json").write_text("null")
    run = subprocess.run([sys.executable, "-m", "lowbit.cli", "generate", str(bad), "-p", "Once", "-n", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("lowbit: error:")], run.stderr


# -- the compiled step's last-line checks -------------------------------------------------------------------------
def test_compiled_step_refuses_a_weight_whose_description_disagrees(made):
    from lowbit.engine.compiled_step import NativeDecodeStep
    from lowbit.engine.runner import Engine
    from lowbit.runtime import checks, clib

    lib = clib.native_library()
    if lib is None:
        pytest.skip("no C compiler: compiled kernels unavailable")
    model, _ = load_model(made["native-rtn4"])
    decoder = Engine(model, context=16).decoder
    assert decoder.native is not None
    layer = decoder.native.spec.layers[1]
    layer.o.n = 65536                      # what a misshapen weight would have told C
    with pytest.raises(LowbitError, match="layer 1 o"):
        checks.check_decode_model(lib, decoder.native.spec, decoder, decoder.native.keep)
    layer.o.n = decoder.hidden
    checks.check_decode_model(lib, decoder.native.spec, decoder, decoder.native.keep)
    assert NativeDecodeStep.build(decoder)[0] is not None


def test_compiled_step_refuses_embeddings_of_another_width(made):
    """C reads batch x hidden floats of embeddings: a narrower embedding table is an error, not a read past x; and
    an empty prompt chunk has no last row for C to take the logits of."""
    from lowbit.engine.runner import Engine

    model, _ = load_model(made["native-rtn4"])
    step = Engine(model, context=16).decoder.native
    if step is None:
        pytest.skip("no C compiler: compiled kernels unavailable")
    one = torch.tensor([1])
    hidden = step.spec.hidden
    assert step(one, torch.tensor([0]), torch.tensor([0])).shape == (1, step.vocab)
    with pytest.raises(LowbitError, match="a prompt chunk of no tokens"):
        step.prefill(torch.tensor([], dtype=torch.long), 0, 0)
    step.embed = torch.nn.Embedding(step.embedding_rows, hidden - 8)
    with pytest.raises(LowbitError, match=rf"rows of shape \[{hidden - 8}\].*hidden size is {hidden}"):
        step(one, torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("field,value,code", [("n", 128, 4), ("groups", 100, 5), ("groups", 1000, 2), ("kind", 7, 1),
                                              ("group", 0, 2)])
def test_c_size_check_codes(field, value, code):
    """csrc/checks.c on a 4-bit RTN weight's description: each field bent past its buffers gives its code."""
    from lowbit.runtime import checks, clib
    from lowbit.schemes.intgrid import IntGrid

    lib = clib.native_library()
    if lib is None:
        pytest.skip("no C compiler: compiled kernels unavailable")
    qw = IntGrid(bits=4, group_size=32).quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
    spec, keep = clib.affine_spec(qw)
    sizes = checks.buffer_sizes(keep)
    checks.check_linear(lib, spec, sizes, "ok")
    bent = clib.LinearSpec.from_buffer_copy(spec)
    setattr(bent, field, value)
    with pytest.raises(LowbitError, match=re.escape(f"{checks.status_text(lib, code)} (status {code})")):
        checks.check_linear(lib, bent, sizes, "bent")


def test_c_linear_refuses_inputs_of_another_width():
    """A 128-input layer on the compiled u8 kernel given 96 columns read 32 floats past the input's buffer
    (outputs near 1e30), and 160 columns were silently truncated."""
    from lowbit.runtime import clib
    from lowbit.runtime.qlinear import QuantLinear
    from lowbit.schemes.intgrid import IntGrid

    if clib.native_library() is None:
        pytest.skip("no C compiler: compiled kernels unavailable")
    qw = IntGrid(bits=4, group_size=32).quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
    layer = QuantLinear(qw, None, kernel="u8")
    assert layer.kernel_name == "u8"
    for width in (96, 160):
        with pytest.raises(LowbitError, match=rf"inputs of shape \[1, {width}\]; it needs \[rows, 128\]"):
            layer(torch.randn(1, width))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)


def test_step_inputs_outside_the_cache(made):
    from lowbit.runtime.checks import check_step_inputs

    with pytest.raises(LowbitError, match="position"):
        check_step_inputs(torch.tensor([1]), torch.tensor([0]), torch.tensor([16]), vocab=512, n_slots=1, context=16)
    check_step_inputs(torch.tensor([1]), torch.tensor([0]), torch.tensor([15]), vocab=512, n_slots=1, context=16)
