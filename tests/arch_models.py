"""Tiny random models of every registry family, built with transformers (never for quality claims), and the
reference a quantized model is compared with: transformers' own model class holding the dequantized weights."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
TINY = {
    "llama": dict(LLAMA_LIKE),
    "mistral": dict(LLAMA_LIKE, sliding_window=None),
    "qwen2": dict(LLAMA_LIKE),
    "qwen3": dict(LLAMA_LIKE, head_dim=16),
    "gemma": dict(LLAMA_LIKE, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    # six layers: llama.cpp's fixed pattern of five sliding-window layers and one global layer
    "gemma3_text": dict(LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, num_hidden_layers=6),
    "phi3": dict(LLAMA_LIKE, num_key_value_heads=4),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, rotary_pct=0.5),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "mixtral": dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(LLAMA_LIKE, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4,
                      num_experts_per_tok=2),
    # renormalised top-k as in released Qwen3-MoE checkpoints (and llama.cpp's qwen3moe, which cannot do otherwise)
    "qwen3_moe": dict(LLAMA_LIKE, head_dim=16, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True),
}
MODEL_TYPES = tuple(TINY)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """(model, config) with random weights scaled so that greedy decoding is not dominated by ties; `overrides`
    change TINY's config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.arch import architecture_for

    config = AutoConfig.for_model(model_type, **COMMON, **{**TINY[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:
                p.uniform_(-0.2, 0.2) if architecture_for(model).norm.value == "rms_plus_one" else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.02)
    return model, config


def tiny_tokenizer(vocab: int = COMMON["vocab_size"]):
    """A byte-level BPE tokenizer with `vocab` tokens (GGUF export stores the tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_map = {tok: i for i, tok in enumerate(sorted(alphabet)[: vocab - 3], start=3)}
    vocab_map.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def reference_model(quantized):
    """transformers' own model class with the quantized model's dequantized weights (fused experts stacked
    back, Conv1D transposed back): what `generate` must agree with."""
    from transformers import AutoModelForCausalLM

    from lowbit.runtime.surgery import dequantized_copy

    plain = dequantized_copy(quantized)
    source = plain.state_dict()
    config = plain.config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    conv1d = {f"{n}.weight" for n, m in fresh.named_modules() if type(m).__name__ == "Conv1D"}
    quantized_conv = {f"{n}.weight" for n, m in plain.named_modules() if type(m).__name__ != "Conv1D"}
    state = {}
    for key, target in fresh.state_dict().items():
        if key.endswith("experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            n = target.shape[0]
            state[key] = torch.stack([torch.cat([source[f"{base}{e}.gate_proj.weight"],
                                                 source[f"{base}{e}.up_proj.weight"]]) for e in range(n)])
        elif key.endswith("experts.down_proj"):
            base = key[: -len("down_proj")]
            state[key] = torch.stack([source[f"{base}{e}.down_proj.weight"] for e in range(target.shape[0])])
        elif key in source:
            value = source[key]
            state[key] = value.t() if key in conv1d and key in quantized_conv else value
        elif getattr(config, "tie_word_embeddings", False) and key.startswith("lm_head"):
            continue
        else:
            raise KeyError(key)
    fresh.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        fresh.tie_weights()
    return fresh


def greedy_reference(model, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt.reshape(1, -1), attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, prompt.numel():].tolist()


def greedy_lowbit(model, prompt: torch.Tensor, n: int) -> list[int]:
    from lowbit.engine.generate import SamplingParams, generate_ids

    return list(generate_ids(model, prompt, SamplingParams(max_new_tokens=n)))
