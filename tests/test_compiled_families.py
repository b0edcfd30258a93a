"""The compiled decode step beyond Llama: every family lowbit's decoder accepts (Gemma 1/2/3, Phi-3, Qwen2 with
biases, Mistral with a window, the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE) against lowbit's torch
decoder (logits, within float32 rounding) and against transformers on the dequantized weights (greedy tokens),
with contexts longer than the sliding windows and soft-caps small enough that leaving one out would change the
numbers."""
from __future__ import annotations

import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine, decoder_blocker
from lowbit.methods.base import QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.runtime import clib
from lowbit.runtime.surgery import set_kernel

from arch_models import COMMON, greedy_reference, reference_model

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

WINDOW = 8
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
NEOX = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.5)
FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
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
    # LayerNorms with bias, biases everywhere, q|k|v fused and interleaved per head, GELU without a gate, partial
    # rotary; attention and MLP in parallel (the default) or one after the other
    "gpt_neox": dict(NEOX),
    "gpt_neox-sequential": dict(NEOX, use_parallel_residual=False),
    # learned positions added to the embedding, no rotary; Conv1D weights ([in, out]), fused c_attn, GELU-tanh
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    # learned positions read 2 rows further on, separate q/k/v with biases, ReLU
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=128),
    # ALiBi slopes on the scores, a LayerNorm of the embeddings, q|k|v interleaved per head, BloomGelu (GELU-tanh)
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    # one LayerNorm feeding attention and MLP in parallel; q|k|v grouped per KV head: multi-query (one KV head) and
    # one group per head
    "falcon": dict(FALCON),
    "falcon-heads": dict(FALCON, multi_query=False),
}
# Mixtures of experts, 256 wide so that GGUF's 256-column K-quant blocks fit every expert projection; experts
# are chosen per token from 4-8 (so the two rows decoded together route to different experts), with each
# family's weighting: Mixtral renormalises the top-k, Qwen2-MoE (norm_topk_prob off) does not and adds its shared
# expert behind a sigmoid gate, Qwen3-MoE (norm_topk_prob on) renormalises, with q/k norms.
MOE_SHAPE = dict(SHAPE, hidden_size=256, intermediate_size=256, head_dim=64)
MOE_FAMILIES = {
    "mixtral": dict(MOE_SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "qwen2_moe": dict(MOE_SHAPE, moe_intermediate_size=256, shared_expert_intermediate_size=512, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(MOE_SHAPE, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=True),
}
# Layouts the expert Linears are decoded from: integer grids (RTN; GPTQ with act-order and groups in its order:
# a column permutation) and
# GGUF blocks (llama.cpp's Q4_K_M mix: Q4_K, and Q6_K for some down projections)
LAYOUTS = {
    "rtn": QuantizeConfig(method="rtn", bits=4, group_size=32, skip=()),
    "gptq": QuantizeConfig(method="gptq", bits=4, group_size=32, skip=(),
                           options={"calib_samples": 4, "desc_act": True, "static_groups": False}),
    "gguf": QuantizeConfig(method="gguf", skip=(), options={"gguf_type": "Q4_K_M"}),
}
PROMPTS = ([1, 5, 17, 33, 8, 9, 40, 12, 3, 22, 7, 61, 14, 30, 2, 19, 44, 6, 27, 11],   # > PREFILLED_NATIVELY
           [4, 9, 23])
STEPS = 32
PREFILLED_NATIVELY = 16      # prompt tokens the compiled step prefills in these tests (the other prompt: GEMMs)


def family_model(model_type: str, layout: str = "rtn"):
    """A tiny random model of the family, quantized as LAYOUTS[layout] says (RTN 4-bit g32 by default), its layers
    on the float32 reference kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = FAMILIES.get(model_type) or MOE_FAMILIES[model_type]
    config = AutoConfig.for_model(model_type.split("-")[0], **COMMON, **shape, tie_word_embeddings=False)
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
    calibration = (torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(0))
                   if layout == "gptq" else None)
    quantize_model(model, LAYOUTS[layout], calibration=calibration, progress=False)
    set_kernel(model, "reference")
    return model


# Configs of supported families that lowbit's decoder refuses by name
VARIANTS = {"opt-350m": ("opt", dict(do_layer_norm_before=False)),        # norms after attention and MLP
            "falcon-40b": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
            "gpt2-unscaled": ("gpt2", dict(scale_attn_weights=False))}                # scores not / sqrt(head_dim)


def variant_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    base, extra = VARIANTS[name]
    config = AutoConfig.for_model(base, **COMMON, **{**FAMILIES[base], **extra})
    return AutoModelForCausalLM.from_config(config).eval()


def decode_run(model, native: bool, forced: list[list[int]] | None = None, engine: Engine | None = None):
    """Prefill both prompts into their own slots, then STEPS decode steps of both rows together: greedy, or
    teacher-forced with `forced` tokens. Returns (tokens per row, logits [steps, rows, vocab])."""
    engine = engine or Engine(model, max_batch=len(PROMPTS), context=64, native=native,
                              prefill_attention_dtype=torch.float32, activations="float32")
    assert (engine.decode_path == "compiled step") == native, engine.decode_path
    engine.decoder.native_prefill_tokens = PREFILLED_NATIVELY   # the first prompt through GEMMs, the second not
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
    assert len(PROMPTS[0]) > PREFILLED_NATIVELY >= len(PROMPTS[1])
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
    engine = Engine(model, context=64, prefill_attention_dtype=torch.float32, activations="float32")
    assert engine.decode_path == "compiled step"
    ours = list(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=STEPS, temperature=0.0),
                                stop_on_eos=False))
    assert ours == greedy_reference(reference_model(model), torch.tensor(PROMPTS[0]), STEPS)


@pytest.mark.parametrize("feature", ["window", "attn_softcap", "final_softcap", "sandwich", "partial_rope",
                                     "parallel", "layer_norm", "alibi"])
def test_each_feature_changes_the_tokens(feature):
    """The tests above can fail: switching one family feature off in the compiled step (leaving the rest as
    transformers runs it) changes the logits beyond the bound, so each feature is really exercised."""
    model_type = {"window": "gemma3_text", "attn_softcap": "gemma2", "final_softcap": "gemma2",
                  "sandwich": "gemma2", "partial_rope": "phi3", "parallel": "gpt_neox",
                  "layer_norm": "gpt_neox", "alibi": "bloom"}[feature]
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
    elif feature == "parallel":
        spec.parallel = 0
    elif feature == "layer_norm":
        spec.layer_norm = 0                # RMSNorm instead (no mean, no bias)
    elif feature == "alibi":
        spec.alibi = None
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


def _routed_experts(model) -> set[int]:
    """Hook every router: the set of expert ids it picks while the model runs (transformers' routers return
    (logits, weights, top-k ids))."""
    from lowbit.models.arch import architecture_for

    arch = architecture_for(model)
    seen: set[int] = set()
    for block in arch.blocks(model):
        block.get_submodule(arch.experts.router).register_forward_hook(
            lambda _m, _i, out: seen.update(out[2].reshape(-1).tolist()))
    return seen


def assert_compiled_equals_torch_and_transformers(model) -> None:
    """Over two prompts and 32 steps of both rows together the compiled step's logits equal the torch decoder's
    within the float32 bound above, and the default engine's 32 greedy tokens are transformers' choices on the
    dequantized weights."""
    tokens_t, logits_t = decode_run(model, native=False)
    tokens_c, logits_c = decode_run(model, native=True, forced=tokens_t)
    assert tokens_c == tokens_t
    assert (logits_c - logits_t).abs().max() <= 1e-4 * logits_t.abs().max()
    engine = Engine(model, context=64, prefill_attention_dtype=torch.float32, activations="float32")
    assert engine.decode_path == "compiled step"
    ours = list(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=STEPS, temperature=0.0),
                                stop_on_eos=False))
    # transformers' greedy choice at every position of prompt + our tokens (one forward: its generate() would
    # hold back the EOS id these random models may pick, as min_new_tokens asks)
    with torch.no_grad():
        reference = reference_model(model)(torch.tensor([PROMPTS[0] + ours])).logits[0]
    assert ours == reference[len(PROMPTS[0]) - 1:-1].argmax(-1).tolist()


def _layout_kinds(model, where: str, layout: str) -> None:
    """The Linears under `where` hold the layout asked for (GGUF blocks; GPTQ's column order)."""
    from lowbit.runtime.qlinear import QuantLinear

    linears = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and where in n]
    kinds = {m.qweight.scheme.name for m in linears}
    assert kinds and all(k.startswith("ggml-") for k in kinds) == (layout == "gguf"), kinds
    if layout == "gptq":
        assert any(m.qweight.g_idx is not None for m in linears)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model_type", list(MOE_FAMILIES))
def test_moe_compiled_step_equals_torch_and_transformers(model_type, layout):
    """Expert layers in the compiled step, for the expert Linears' integer-grid and GGUF-block layouts: the two
    bounds above (the torch decoder runs transformers' own routing module over lowbit's quantized experts), and
    every expert is routed to during the run."""
    model = family_model(model_type, layout)
    assert decoder_blocker(model) is None
    _layout_kinds(model, ".experts.", layout)
    routed = _routed_experts(model)
    decode_run(model, native=False)
    n_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert routed == set(range(n_experts))        # every expert runs at some point
    assert_compiled_equals_torch_and_transformers(model)


@pytest.mark.parametrize("layout", ["gptq", "gguf"])
def test_neox_interleaved_qkv_in_every_layout(layout):
    """GPT-NeoX's query_key_value (rows interleaved per head) is read through a row-reordered copy: the copy is
    right for GPTQ's column-ordered codes and for GGUF blocks too (the two bounds above)."""
    model = family_model("gpt_neox", layout)
    _layout_kinds(model, "query_key_value", layout)
    assert_compiled_equals_torch_and_transformers(model)


@pytest.mark.parametrize("model_type,rule", [("mixtral", "renormalize"), ("qwen2_moe", "renormalize"),
                                             ("qwen2_moe", "shared"), ("qwen3_moe", "top_k")])
def test_each_routing_rule_changes_the_logits(model_type, rule):
    """The MoE test above can fail: changing one routing rule in the compiled step (renormalising the top-k or
    not, dropping Qwen2-MoE's shared expert, one expert fewer per token) moves the logits beyond its bound."""
    model = family_model(model_type)
    tokens_t, logits_t = decode_run(model, native=False)
    engine = Engine(model, max_batch=len(PROMPTS), context=64, prefill_attention_dtype=torch.float32)
    spec = engine.decoder.native.spec
    for i in range(spec.n_layers):
        moe = spec.layers[i].moe.contents
        if rule == "renormalize":
            moe.renormalize = 1 - moe.renormalize
        elif rule == "shared":
            moe.shared, moe.router[1].n = 0, 0
        else:
            moe.top_k -= 1
    _, logits_c = decode_run(model, native=True, forced=tokens_t, engine=engine)
    assert (logits_c - logits_t).abs().max() > 1e-2 * logits_t.abs().max()


@pytest.mark.skipif(not clib.has_act8(), reason="this build has no int8-activation kernels")
def test_moe_arithmetic_counts_routers_and_experts():
    """The step's "arithmetic" counts every matmul it runs: per layer q, k, v, o, the router and shared-expert
    gate (float weights: float32) and each expert's gate, up and down (RTN codes: int8 when asked for)."""
    from lowbit.runtime.qlinear import QuantLinear

    model = family_model("qwen2_moe")
    config = model.config
    engine = Engine(model, context=32, activations="int8")
    assert engine.decode_path == "compiled step"
    total = config.num_hidden_layers * (4 + 2 + 3 * (config.num_experts + 1)) + 1      # and lm_head
    rounded = sum(type(m) is QuantLinear for m in model.modules())      # not embeddings (QuantEmbedding)
    assert rounded < total
    assert engine.arithmetic == f"int8 activations in {rounded} of {total} matmuls, float32 in the others (int8)"


@pytest.mark.parametrize("model_type,path", [("gemma2", "compiled step"),
                                             ("falcon-40b", "transformers forward (ln_attn / ln_mlp blocks "
                                                            "(new_decoder_architecture))")])
def test_bench_says_which_decode_path_ran(model_type, path, tmp_path, capsys):
    from lowbit.api import save
    from lowbit.cli import main

    from arch_models import tiny_model

    model = family_model(model_type) if model_type in FAMILIES else variant_model(model_type)
    saved = save(model, tmp_path / model_type, tokenizer=None)
    assert main(["-q", "bench", str(saved), "-p", "2", "-n", "2", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert f"decode: {path}\n" in out
    assert "arithmetic: float32 activations" in out     # lowbit's own layouts: float32 unless asked otherwise


@pytest.mark.parametrize("model_type,reason", [("falcon-40b", "ln_attn / ln_mlp blocks (new_decoder_architecture)"),
                                               ("opt-350m",
                                                "norms after attention and MLP (do_layer_norm_before=False)"),
                                               ("gpt2-unscaled",
                                                "unscaled attention scores (scale_attn_weights=False)")])
def test_families_outside_the_decoder_fall_back_with_their_reason(model_type, reason):
    """The engine asks the family's Architecture, not a list: what the decoder cannot compute is named, and
    those models run through transformers' forward with lowbit's quantized Linears."""
    from arch_models import tiny_model

    model = variant_model(model_type)
    assert decoder_blocker(model) == reason
    engine = Engine(model, context=32)
    assert engine.decode_path == f"transformers forward ({reason})" and not engine.fast_path


def test_moe_models_the_step_cannot_read_fall_back_with_their_reason():
    """Experts still in transformers' fused 3-D tensors (a float model lowbit did not prepare) run on the torch
    decoder, saying why; dense MLP layers among the expert ones (Qwen-MoE's mlp_only_layers) on transformers'
    forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from arch_models import tiny_model

    fused = tiny_model("mixtral")[0]
    engine = Engine(fused, context=32)
    assert engine.decode_path == ("torch decoder (layer 0: expert weights fused in 3-D tensors (not one Linear per "
                                  "expert))")
    config = AutoConfig.for_model("qwen2_moe", **COMMON, **MOE_FAMILIES["qwen2_moe"], mlp_only_layers=[1])
    mixed = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert decoder_blocker(mixed) == "dense MLP layers [1] among the expert layers"
    path = Engine(mixed, context=32).decode_path
    assert path == "transformers forward (dense MLP layers [1] among the expert layers)"


@pytest.mark.parametrize("model_type", list(MOE_FAMILIES))
def test_moe_gguf_file_kept_quantized_runs_compiled(model_type, tmp_path):
    """A GGUF file with llama.cpp's stacked expert tensors (ffn_*_exps) loads kept quantized, each expert a view of
    its rows of the stack (the blocks it was written from, bit for bit), and decodes through the compiled step:
    its logits equal the torch decoder's within the bound above, and its 32 greedy tokens are transformers'
    choices on the file's dequantized weights."""
    from lowbit.formats.gguf import export_gguf
    from lowbit.models.gguf_import import load_gguf_as_hf
    from lowbit.models.loading import load_model
    from lowbit.runtime.qlinear import QuantLinear

    from arch_models import tiny_tokenizer

    model = family_model(model_type, "gguf")
    model.config.sliding_window = None     # llama.cpp's "llama" (Mixtral) stores no window
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "moe.gguf", type="Q4_K_M", progress=False)
    loaded, _ = load_model(path, keep_quantized=True)
    written = dict(model.named_modules())
    experts = [(n, m) for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and ".experts." in n]
    assert experts and all(torch.equal(m.qweight.extra["blocks"], written[n].qweight.extra["blocks"])
                           for n, m in experts)
    set_kernel(loaded, "reference")
    tokens_t, logits_t = decode_run(loaded, native=False)
    _, logits_c = decode_run(loaded, native=True, forced=tokens_t)
    assert (logits_c - logits_t).abs().max() <= 1e-4 * logits_t.abs().max()
    engine = Engine(loaded, context=64, prefill_attention_dtype=torch.float32, activations="float32")
    assert engine.decode_path == "compiled step"
    ours = list(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=STEPS, temperature=0.0),
                                stop_on_eos=False))
    reference, _ = load_gguf_as_hf(path)
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPTS[0] + ours])).logits[0]
    assert ours == logits[len(PROMPTS[0]) - 1:-1].argmax(-1).tolist()
