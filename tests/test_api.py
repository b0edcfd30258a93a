"""The Python API and atomic outputs."""
import pytest
import torch

import lowbit
from lowbit.runtime.surgery import quantized_modules


def test_load_quantize_save_load(stories_dir, tmp_path):
    model = lowbit.load(stories_dir)
    assert model.tokenizer is not None
    lowbit.quantize(model, lowbit.QuantizeConfig(method="rtn", bits=4, group_size=-1, symmetric=False),
                    progress=False)
    assert len(list(quantized_modules(model))) == 35
    out = lowbit.save(model, tmp_path / "m")
    again = lowbit.load(out)
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_quantize_from_path_with_keyword_config(stories_dir):
    model = lowbit.quantize(stories_dir, bits=8, group_size=-1, progress=False)
    assert model.lowbit_config.bits == 8
    assert all(m.qweight.scheme.bits == 8 for _, m in quantized_modules(model))


def test_failed_save_leaves_nothing(stories_dir, tmp_path, monkeypatch):
    import lowbit.formats.native as native

    model = lowbit.load(stories_dir)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    monkeypatch.setattr(native, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        lowbit.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_output(stories_dir, tmp_path, monkeypatch):
    import lowbit.formats.native as native

    model = lowbit.load(stories_dir)
    lowbit.save(model, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(native, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        lowbit.save(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_method_options_as_keywords():
    from lowbit.api import config_from_kwargs

    config = config_from_kwargs(method="nf4", double_quant=True, blocksize=128, skip=("lm_head",))
    assert config.method == "nf4" and config.options == {"double_quant": True, "blocksize": 128}
    assert config.skip == ("lm_head",)


@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_quantized_tied_output_projection_saves_and_loads(tmp_path, method):
    """A model whose lm_head shares the embedding (SmolLM2, stories260K-style): quantizing the head unties it,
    and the saved model loads back with the same logits (transformers must not re-tie it onto the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                         tie_word_embeddings=True)).eval()
    lowbit.quantize(model, lowbit.QuantizeConfig(method=method, group_size=32, skip=()))
    assert not model.config.tie_word_embeddings
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        expected = model(ids).logits
    lowbit.save(model, tmp_path / "out")
    again = lowbit.load(tmp_path / "out")
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, expected)
