"""GGUF import of the real SmolLM2 Q4_1 file: exact dequantization and transformers-identical behaviour."""
import numpy as np
import pytest
import torch

from lowbit.models.arch import architecture_for
from lowbit.models.arch.base import gguf_tensor_name, permute_qk, unpermute_qk
from lowbit.models.gguf_import import open_gguf


def test_dequantization_matches_gguf_package(smollm2_gguf):
    """lowbit's reader (the one GGUF parser) dequantizes every tensor type exactly as gguf-py does."""
    from gguf import GGUFReader, quants

    reference = {t.name: t for t in GGUFReader(str(smollm2_gguf)).tensors}
    seen = set()
    for t in open_gguf(smollm2_gguf).tensors.values():
        if t.type_name in seen:
            continue
        seen.add(t.type_name)
        r = reference[t.name]
        ref = quants.dequantize(r.data, r.tensor_type).reshape(t.shape)
        assert np.array_equal(t.to_float(), ref), t.name
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf):
    """SmolLM2 as transformers' own GGUF loader builds it: the reference for our importer."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_weights_equal_transformers_gguf_loading(smollm2, transformers_smollm2):
    ours, _ = smollm2
    theirs = transformers_smollm2
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(a[key], b[key]), key


def test_greedy_output_equals_transformers(smollm2, transformers_smollm2):
    ours, tok = smollm2
    theirs = transformers_smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    a = ours.generate(ids, max_new_tokens=24, do_sample=False)
    b = theirs.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a[0])


def test_config_and_tokenizer_from_metadata(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == pytest.approx(100000.0)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("Hello world").input_ids) == "Hello world"


def test_name_maps_and_permutation_are_inverse():
    llama = architecture_for("llama")
    for hf, name in (("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"),
                     ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                     ("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")):
        assert gguf_tensor_name(llama, hf, 4) == (name, None)
    w = torch.randn(96, 40)
    assert torch.equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not torch.equal(permute_qk(w, 6), w)


def test_import_writes_folder_transformers_loads(smollm2_gguf, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    subprocess.run([sys.executable, "-m", "lowbit.cli", "-q", "import", str(smollm2_gguf), "-o", str(out)],
                   check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    assert tok("Hi").input_ids
