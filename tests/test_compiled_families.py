"""The compiled decode step beyond Llama: every family lowbit's decoder accepts (Gemma 1/2/3, Phi-3, Qwen2 with
biases, Mistral with a window) against lowbit's torch decoder (logits, within float32 rounding) and against
transformers on the dequantized weights (greedy tokens), with contexts longer than the sliding windows and
soft-caps small enough that leaving one out would change the numbers."""
from __future__ import annotations

import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine, NATIVE_PREFILL_TOKENS, decoder_blocker
from lowbit.methods.base import QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.runtime import clib
from lowbit.runtime.surgery import set_kernel

from arch_models import COMMON, greedy_reference, reference_model

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

WINDOW = 8
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# Each family with the features it exercises switched on and made visible at this size.
FAMILIES = {
    "gemma": dict(SHAPE, head_dim=16),
    # soft-caps near the size of the tiny model's scores and logits, so tanh is far from the identity
    "gemma2": dict(SHAPE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                   attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
    # sliding layers with their own rope base, a global layer every third one
    "gemma3_text": dict(SHAPE, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, num_hidden_layers=3,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        final_logit_softcapping=2.0),
    "phi3": dict(SHAPE, partial_rotary_factor=0.5, sliding_window=WINDOW),
    "qwen2": dict(SHAPE),
    "mistral": dict(SHAPE, sliding_window=WINDOW),
}
PROMPTS = ([1, 5, 17, 33, 8, 9, 40, 12, 3, 22, 7, 61, 14, 30, 2, 19, 44, 6, 27, 11],   # > NATIVE_PREFILL_TOKENS
           [4, 9, 23])
STEPS = 32


def family_model(model_type: str):
    """A tiny random model of the family, RTN 4-bit g32, its layers on the float32 reference kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type], tie_word_embeddings=False)
    if model_type == "qwen2":
        assert config.layer_types is not None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            elif "norm" in name:        # Gemma scales by 1 + w, the others by w
                p.uniform_(-0.3, 0.3) if model_type.startswith("gemma") else p.uniform_(0.7, 1.3)
            else:                       # biases (Qwen2's q/k/v): large enough that dropping one shows
                p.normal_(0, 0.5)
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32, skip=()), progress=False)
    set_kernel(model, "reference")
    return model


def decode_run(model, native: bool, forced: list[list[int]] | None = None):
    """Prefill both prompts into their own slots, then STEPS decode steps of both rows together: greedy, or
    teacher-forced with `forced` tokens. Returns (tokens per row, logits [steps, rows, vocab])."""
    engine = Engine(model, max_batch=len(PROMPTS), context=64, native=native, prefill_attention_dtype=torch.float32)
    assert (engine.decode_path == "compiled step") == native, engine.decode_path
    seqs = [engine.start(p, SamplingParams(max_new_tokens=STEPS + 2, temperature=0.0), stop_on_eos=False)
            for p in PROMPTS]
    tokens = [[s.generated[0]] for s in seqs]
    all_logits = []
    for step in range(STEPS):
        feed = [row[step] if forced is None else forced[i][step] for i, row in enumerate(tokens)]
        logits = engine.decoder.decode(torch.tensor(feed), torch.tensor([s.slot for s in seqs]),
                                       torch.tensor([len(p) + step for p in PROMPTS]))
        all_logits.append(logits)
        for row, choice in zip(tokens, logits.argmax(-1).tolist()):
            row.append(choice)
    return tokens, torch.stack(all_logits)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_compiled_step_equals_torch_decoder(model_type):
    """Same weights and cache: over two prompts (one prefilled through the torch decoder, one through the
    compiled step) and 32 decode steps of both together, the compiled step's logits equal the torch decoder's
    to float32 rounding. Bound: each logit is a chain of float32 dot products of <= 128 terms through 2-3
    layers, relative rounding ~ 128 * 2^-24 per product, a few 1e-5 of the largest logit at most; 1e-4 of
    it is the margin. The greedy tokens agree."""
    model = family_model(model_type)
    assert decoder_blocker(model) is None
    assert len(PROMPTS[0]) > NATIVE_PREFILL_TOKENS >= len(PROMPTS[1])
    tokens_t, logits_t = decode_run(model, native=False)
    tokens_c, logits_c = decode_run(model, native=True, forced=tokens_t)
    assert tokens_c == tokens_t
    assert (logits_c - logits_t).abs().max() <= 1e-4 * logits_t.abs().max()
    if FAMILIES[model_type].get("final_logit_softcapping"):
        assert logits_t.abs().max() < FAMILIES[model_type]["final_logit_softcapping"]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_compiled_step_greedy_equals_transformers(model_type):
    """The default engine (compiled step) generates, from a prompt past the sliding window, the same 32 greedy
    tokens as transformers' own model class running the dequantized weights (its masks, caches, soft-caps)."""
    model = family_model(model_type)
    engine = Engine(model, context=64, prefill_attention_dtype=torch.float32)
    assert engine.decode_path == "compiled step"
    ours = list(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=STEPS, temperature=0.0),
                                stop_on_eos=False))
    assert ours == greedy_reference(reference_model(model), torch.tensor(PROMPTS[0]), STEPS)


@pytest.mark.parametrize("feature", ["window", "attn_softcap", "final_softcap", "sandwich", "partial_rope"])
def test_each_feature_changes_the_tokens(feature):
    """The tests above can fail: switching one family feature off in the compiled step (leaving the rest as
    transformers runs it) changes the logits beyond the bound, so each feature is really exercised."""
    model_type = {"window": "gemma3_text", "attn_softcap": "gemma2", "final_softcap": "gemma2",
                  "sandwich": "gemma2", "partial_rope": "phi3"}[feature]
    model = family_model(model_type)
    tokens_t, logits_t = decode_run(model, native=False)
    engine = Engine(model, max_batch=len(PROMPTS), context=64, prefill_attention_dtype=torch.float32)
    spec = engine.decoder.native.spec
    if feature == "window":
        for i in range(spec.n_layers):
            spec.layers[i].window = 0
    elif feature == "attn_softcap":
        spec.attn_softcap = 0.0
    elif feature == "final_softcap":
        spec.final_softcap = 0.0
    elif feature == "sandwich":
        spec.layers[0].attn_out_norm = None
    else:
        spec.rope_dim //= 2                # rotate a quarter of each head instead of half (reads within the tables)
    seqs = [engine.start(p, SamplingParams(max_new_tokens=STEPS + 2, temperature=0.0), stop_on_eos=False)
            for p in PROMPTS]
    changed = 0.0
    for step in range(STEPS):
        logits = engine.decoder.decode(torch.tensor([row[step] for row in tokens_t]),
                                       torch.tensor([s.slot for s in seqs]),
                                       torch.tensor([len(p) + step for p in PROMPTS]))
        changed = max(changed, float((logits - logits_t[step]).abs().max()))
    assert changed > 1e-2 * logits_t.abs().max()


@pytest.mark.parametrize("model_type,path", [("gemma2", "compiled step"),
                                             ("gpt2", "transformers forward (layer norms)")])
def test_bench_says_which_decode_path_ran(model_type, path, tmp_path, capsys):
    from lowbit.api import save
    from lowbit.cli import main

    from arch_models import tiny_model

    model = family_model(model_type) if model_type in FAMILIES else tiny_model(model_type)[0]
    saved = save(model, tmp_path / model_type, tokenizer=None)
    assert main(["-q", "bench", str(saved), "-p", "2", "-n", "2", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert f"decode: {path}\n" in out
    assert "arithmetic: float32 activations" in out     # lowbit's own layouts: float32 unless asked otherwise


@pytest.mark.parametrize("model_type,reason", [("gpt_neox", "layer norms"), ("mixtral", "mixture-of-experts MLP"),
                                               ("qwen3_moe", "mixture-of-experts MLP")])
def test_families_outside_the_decoder_fall_back_with_their_reason(model_type, reason):
    """The engine asks the family's Architecture, not a list: what the decoder cannot compute is named, and
    those models run through transformers' forward with lowbit's quantized Linears."""
    from arch_models import tiny_model

    model = tiny_model(model_type)[0]
    assert decoder_blocker(model) == reason
    engine = Engine(model, context=32)
    assert engine.decode_path == f"transformers forward ({reason})" and not engine.fast_path
