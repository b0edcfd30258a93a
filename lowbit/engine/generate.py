"""Token-by-token generation with a KV cache, streaming text as it comes, and chat prompt building."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lowbit.errors import LowbitError
from lowbit.runtime.clib import sample_rows_native


@dataclass
class SamplingParams:
    """Sampling settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise LowbitError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise LowbitError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LowbitError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LowbitError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        return self


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; `uniforms` [B] (float64 in [0, 1)): the random numbers
    to draw with, one a row, instead of drawing them from `generator`."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    if not params.top_k and params.top_p >= 1:    # temperature alone: the compiled sampler, where there is one
        if uniforms is None:
            uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
        drawn = sample_rows_native(logits, params.temperature, uniforms)
        if drawn is not None:
            return drawn
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64)
    return draw(probs, uniforms)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                ) -> list[int]:
    """One token id per row of logits [B, V], row b sampled with params[b] and generators[b]: the tokens
    `sample_next` gives each row alone (each row draws its one number from its own generator), computed together
    for rows with the same settings. A batch of 32 streams sampled row by row spent ~30 torch calls a row; one
    softmax / cumsum over the rows is what keeps sampling small next to a 32-row decode step."""
    tokens = [0] * len(params)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    for rows in groups.values():
        subset = logits if len(rows) == logits.shape[0] else logits.index_select(0, torch.tensor(rows))
        first = params[rows[0]]
        uniforms = None if first.temperature == 0 else torch.cat(
            [torch.rand(1, generator=generators[row], dtype=torch.float64) for row in rows])
        for row, token in zip(rows, sample_next(subset, first, None, uniforms).tolist()):
            tokens[row] = token
    return tokens


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from probabilities [B, V] by inverse CDF: per row the first token whose cumulative
    probability exceeds uniforms[b] (in [0, 1)) times the row's total. One random number a row: torch.multinomial
    drew V exponentials a row (49k for SmolLM2, ~1 ms), which at 32 rows cost as much as the decode step itself.
    The cumulative sums are float32 (float64 took 3x longer): each is off by at most V * 2^-24 of the total, a shift
    of the boundaries between tokens far below any probability a sampler is meant to resolve."""
    cdf = probs.float().cumsum(-1)
    ids = torch.searchsorted(cdf, (uniforms.float() * cdf[:, -1])[:, None], right=True)[:, 0]
    past = ids >= probs.shape[-1]
    if bool(past.any()):   # a target rounded up to the total: the last token with nonzero probability instead
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
        ids = torch.where(past, last, ids)
    return ids


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill; decode speed counts the tokens after it.
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, params: SamplingParams, stats: GenerationStats | None = None
                 ) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1), prefilling the prompt once and decoding with a KV cache."""
    from transformers import DynamicCache

    from lowbit.engine.runner import engine_generate_ids, supports_engine
    if supports_engine(model):  # lowbit's engine (issue 6): static KV cache, fused q/k/v and gate/up matmuls
        yield from engine_generate_ids(model, input_ids, params, stats)
        return
    params.validate()
    stats = stats if stats is not None else GenerationStats()
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx and input_ids.shape[-1] + params.max_new_tokens > max_ctx:
        raise LowbitError(f"prompt ({input_ids.shape[-1]} tokens) + {params.max_new_tokens} new tokens exceeds the "
                          f"model's context of {max_ctx}; shorten the prompt or lower -n")
    cache = DynamicCache(config=model.config)
    ids = input_ids.reshape(1, -1)
    stats.prompt_tokens = ids.shape[1]
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    stats.prompt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        tid = int(token[0])
        stats.token_ids.append(tid)
        stats.new_tokens += 1
        stats.decode_seconds = time.perf_counter() - t0
        yield tid
        if tid in params.stop_token_ids or step == params.max_new_tokens - 1:
            break
        if step == 0:
            t0 = time.perf_counter()  # decode time starts after the first (prefill) token
        logits = model(token.reshape(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
        stats.decode_seconds = time.perf_counter() - t0


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a generation: the tokenizer's eos (and the chat end-of-turn token if it has one)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for special in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if tokenizer is not None and special in tokenizer.get_vocab():
            ids.add(int(tokenizer.convert_tokens_to_ids(special)))
    return tuple(sorted(ids))


def encode_prompt(tokenizer, prompt: str, chat: bool = False, messages: list[dict] | None = None) -> torch.Tensor:
    """Token ids of a plain prompt, or of chat messages through the tokenizer's chat template."""
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer, so it cannot take a text prompt")
    if chat or messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("this tokenizer has no chat template; use `lowbit generate` with a plain prompt")
        messages = messages if messages is not None else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return torch.as_tensor(ids).reshape(-1)
    return tokenizer(prompt, return_tensors="pt").input_ids[0]


def stream_text(tokenizer, token_ids: Iterator[int], on_text: Callable[[str], None]) -> str:
    """Decode tokens incrementally, calling `on_text` with each new piece of text; returns the whole text."""
    ids: list[int] = []
    shown = ""
    for tid in token_ids:
        ids.append(tid)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        on_text(text[len(shown):])
        shown = text
    return shown


def generate_text(model, tokenizer, prompt: str, params: SamplingParams, chat: bool = False,
                  on_text: Callable[[str], None] | None = None,
                  messages: list[dict] | None = None) -> tuple[str, GenerationStats]:
    """Generate a continuation (or chat reply) of `prompt`, streaming pieces to `on_text`."""
    ids = encode_prompt(tokenizer, prompt, chat, messages)
    if not params.stop_token_ids:
        params.stop_token_ids = stop_ids(tokenizer)
    stats = GenerationStats()
    text = stream_text(tokenizer, generate_ids(model, ids, params, stats), on_text or (lambda s: None))
    return text, stats
