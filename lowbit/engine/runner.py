"""lowbit's inference engine: batched prefill, decode over a preallocated KV cache, sampling, stop tokens.

The engine runs a loaded Hugging Face model whose Linear layers may be QuantLinear modules. For the Llama
family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) it runs its own decoder loop over the model's modules: q/k/v and
gate/up projections fused into one matmul each, rotary tables computed once, a static cache of shape
[layers, slots, kv_heads, context, head_dim] written in place, and attention over only the filled prefix. One
cache slot per sequence lets sequences at different positions decode together in one step (continuous
batching). Other architectures run through transformers' own forward, one sequence at a time.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.engine.generate import SamplingParams, sample_next
from lowbit.engine.compiled_step import NativeDecodeStep
from lowbit.errors import LowbitError
from lowbit.quantized import QuantizedWeight
from lowbit.runtime.cpu import gemm_dtype
from lowbit.runtime.qlinear import QuantLinear

FAST_PATH_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Prompt chunks up to this many tokens run through the compiled step (float32, as decoding is: measured as fast
# as bf16 GEMMs up to 16 tokens, 2x slower at 32), longer ones through bf16 GEMMs.
NATIVE_PREFILL_TOKENS = 16
DEFAULT_CONTEXT = 2048


def release_freed_heap() -> None:
    """Hand memory freed while loading back to the OS (glibc keeps freed arenas otherwise: measured 112 MB
    on Qwen2.5-0.5B's GGUF after load); a no-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return
    if trim is not None:
        trim(0)


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads for torch (None or 0: keep torch's default); returns the count in use."""
    if threads is not None and threads < 0:
        raise LowbitError(f"--threads must be >= 1 (got {threads})")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass
class Sequence:
    """One request being generated: its tokens, its cache slot and position, its random state."""

    prompt_ids: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    position: int = 0          # number of tokens already in the cache
    finish_reason: str | None = None   # "stop", "length", or "cancelled" once finished
    generator: torch.Generator | None = None
    stop_on_eos: bool = True
    prefill_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits, with the same sampler as `lowbit generate`."""
    return int(sample_next(logits[None], params, generator)[0])


# -- linear fusion -------------------------------------------------------------------------------------------

class _DenseLinear(nn.Module):
    """A plain float Linear built from several (their weights stacked along the output dimension)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _stacked_bias(modules: SequenceType[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach().to(dtype) if b is not None else torch.zeros(m.out_features, dtype=dtype)
                      for b, m in zip(biases, modules)])


def fuse_linears(modules: SequenceType[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of Linears that read the same input, or None if their
    weights cannot be stacked (different schemes, act-order permutations, scheme-specific extra tensors)."""
    if all(type(m) is nn.Linear for m in modules):
        weight = torch.cat([m.weight.detach() for m in modules])
        return _DenseLinear(weight, _stacked_bias(modules, weight.dtype))
    if not all(isinstance(m, QuantLinear) for m in modules):
        return None
    weights: list[QuantizedWeight] = [m.qweight for m in modules]
    first = weights[0]
    # GGUF block schemes keep their file bytes in `extra` only for writing; kernels compute from codes and
    # statistics, so a fused copy (compute only) may drop them. Other schemes' extras may carry numbers.
    stackable = all(
        qw.scheme == first.scheme and qw.group_size == first.group_size and qw.g_idx is None
        and (not qw.extra or qw.scheme.kind == "ggml")
        and qw.in_features == first.in_features and (qw.zeros is None) == (first.zeros is None)
        and qw.scales.shape[1] == first.scales.shape[1] for qw in weights)
    if not stackable:
        return None
    fused = QuantizedWeight(
        scheme=first.scheme, shape=(sum(qw.out_features for qw in weights), first.in_features),
        codes=torch.cat([qw.codes for qw in weights]), scales=torch.cat([qw.scales for qw in weights]),
        zeros=None if first.zeros is None else torch.cat([qw.zeros for qw in weights]),
        group_size=first.group_size)
    return QuantLinear(fused, _stacked_bias(modules, torch.float32), kernel=modules[0].kernel_preference)


def _fused_or_separate(modules: SequenceType[nn.Module], fuse: bool
                       ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Module]]:
    """A callable returning the concatenated outputs of `modules` (one matmul when they can be fused), and the
    modules it runs (the fused one, or the originals)."""
    fused = fuse_linears(modules) if fuse else None
    if fused is not None:
        return fused, [fused]
    return (lambda x: torch.cat([m(x) for m in modules], dim=-1)), list(modules)


# -- the Llama-family decoder ---------------------------------------------------------------------------------

@dataclass
class _Layer:
    input_norm: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: nn.Module
    qkv_parts: list[nn.Module]        # the modules `qkv` runs, in output order
    gate_up_parts: list[nn.Module]


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class LlamaFamilyDecoder:
    """Runs a Llama-family HF model's weights with lowbit's static cache (no HF forward on the hot path)."""

    def __init__(self, model: nn.Module, slots: int, context: int, kv_dtype: torch.dtype, fuse: bool = True,
                 prefill_attention_dtype: torch.dtype = torch.float32, native: bool = True,
                 int8_activations: bool = False):
        """`native`: decode single tokens with the compiled step (engine/compiled_step.py) when it can run the model;
        `int8_activations`: let it round activations to int8 for integer-code weights (faster, llama.cpp's
        arithmetic)."""
        config = model.config
        self.prefill_attention_dtype = prefill_attention_dtype
        inner = model.model
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        if config.hidden_act not in ("silu", "swish"):
            raise LowbitError(f"activation {config.hidden_act!r} is not supported by the fast decoder")
        # The compiled step reads q/k/v and gate/up as parts of one matmul, so it needs no fused copies of their
        # codes: layers are built unfused for it, and fused only if it cannot run the model.
        self.layers = self._layers(inner, fuse and not native)
        self.intermediate = config.intermediate_size
        self.context = context
        # Rotary tables for every position, computed once with the model's own rotary module (rope scaling
        # variants included), exactly as transformers computes them per step.
        positions = torch.arange(context)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        shape = (len(self.layers), slots, self.kv_heads, context, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype)
        self.native = NativeDecodeStep.build(self, int8_activations) if native else None
        if self.native is None and native and fuse:
            self.layers = self._layers(inner, fuse=True)

    @staticmethod
    def _layers(inner: nn.Module, fuse: bool) -> list[_Layer]:
        layers = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, qkv_parts = _fused_or_separate([attn.q_proj, attn.k_proj, attn.v_proj], fuse)
            gate_up, gate_up_parts = _fused_or_separate([mlp.gate_proj, mlp.up_proj], fuse)
            layers.append(_Layer(
                input_norm=block.input_layernorm, qkv=qkv,
                q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                o_proj=attn.o_proj, post_norm=block.post_attention_layernorm,
                gate_up=gate_up, down=mlp.down_proj, qkv_parts=qkv_parts, gate_up_parts=gate_up_parts))
        return layers

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] for one token per row: row b's token `tokens[b]` at `positions[b]` of slot `slots[b]`."""
        if self.native is not None:
            return self.native(tokens, slots, positions)
        low, high = int(slots.min()), int(slots.max()) + 1
        # Slots low..high-1 run as one batch; idle slots in between are free, so the throwaway token they
        # compute at position 0 overwrites nothing live (a new sequence's prefill rewrites its slot from 0).
        batch_tokens = torch.zeros(high - low, 1, dtype=torch.long)
        batch_positions = torch.zeros(high - low, dtype=torch.long)
        batch_tokens[slots - low, 0] = tokens
        batch_positions[slots - low] = positions
        return self.forward(batch_tokens, slice(low, high), batch_positions)[slots - low]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, rows: slice, positions: torch.Tensor, all_logits: bool = False
                ) -> torch.Tensor:
        """Logits for `tokens` [B, S] in cache slots `rows` whose first token sits at `positions` [B].

        S > 1 (prefill) requires B == 1. Returns [B, vocab] for the last token, or [B, S, vocab] if all_logits.
        """
        batch, seq = tokens.shape
        if self.native is not None and not all_logits:
            if seq == 1:
                return self.native(tokens[:, 0], torch.arange(rows.start or 0, rows.stop), positions)
            if batch == 1 and seq <= NATIVE_PREFILL_TOKENS:
                return self.native.prefill(tokens[0], rows.start or 0, int(positions[0]))
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        same_start = batch == 1 or bool((positions == positions[0]).all())
        start = int(positions[0])
        if same_start:
            end = start + seq
            cos, sin = self.cos[start:end][None, :, None], self.sin[start:end][None, :, None]
            attend = end
        else:
            assert seq == 1, "sequences at different positions decode one token at a time"
            cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
            attend = int(positions.max()) + 1
        if same_start and start == 0:
            mask, causal = None, seq > 1
        elif same_start:
            # Queries i may see keys j <= start + i; with seq == 1 that is the whole filled prefix.
            mask = None if seq == 1 else (torch.arange(attend)[None, :] <= torch.arange(start, end)[:, None])
            causal = False
        else:
            mask = (torch.arange(attend)[None, :] <= positions[:, None])[:, None, None, :]
            causal = False
        batch_index = torch.arange(batch)

        x = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm)
            qkv = layer.qkv(h).view(batch, seq, heads + 2 * kv_heads, head_dim)
            q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
                qk = torch.cat((q, k), dim=2)
            else:
                qk = qkv[:, :, :heads + kv_heads]
            qk = self._rope(qk, cos, sin).transpose(1, 2)
            q, k = qk[:, :heads], qk[:, heads:]
            v = v.transpose(1, 2)
            k_cache = self.k_cache[index, rows]
            v_cache = self.v_cache[index, rows]
            if same_start:
                k_cache[:, :, start:end] = k
                v_cache[:, :, start:end] = v
            else:
                k_cache[batch_index, :, positions] = k[:, :, 0]
                v_cache[batch_index, :, positions] = v[:, :, 0]
            keys, values = k_cache[:, :, :attend], v_cache[:, :, :attend]
            dtype = self.prefill_attention_dtype if seq > 1 else q.dtype
            if keys.dtype != dtype or q.dtype != dtype:
                q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=kv_heads != heads).to(x.dtype)
            x = x + layer.o_proj(attn.transpose(1, 2).reshape(batch, seq, heads * head_dim))
            h = _rms_norm(x, layer.post_norm)
            gate, up = layer.gate_up(h).split((self.intermediate, self.intermediate), dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if not all_logits:
            x = x[:, -1]
        return self.lm_head(_rms_norm(x, self.final_norm))


class HFDecoder:
    """Fallback for architectures without a fast path: transformers' forward with one cache per slot."""

    def __init__(self, model: nn.Module, slots: int, context: int):
        self.model = model
        self.context = context
        self.caches: list[Any] = [None] * slots

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, rows: slice, positions: torch.Tensor, all_logits: bool = False
                ) -> torch.Tensor:
        from transformers import DynamicCache

        outputs = []
        for i, slot in enumerate(range(rows.start or 0, rows.stop)):
            if int(positions[i]) == 0:
                self.caches[slot] = DynamicCache(config=self.model.config)
            pos = torch.arange(int(positions[i]), int(positions[i]) + tokens.shape[1])[None]
            out = self.model(input_ids=tokens[i:i + 1], past_key_values=self.caches[slot], position_ids=pos,
                             use_cache=True)
            outputs.append(out.logits if all_logits else out.logits[:, -1])
        return torch.cat(outputs)

    def release(self, slot: int) -> None:
        self.caches[slot] = None


# -- the engine ------------------------------------------------------------------------------------------------

def eos_token_ids(model: nn.Module, tokenizer: Any = None) -> tuple[int, ...]:
    """Token ids that end generation: the generation config's eos ids, else the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(dict.fromkeys(int(i) for i in ids))


class Engine:
    """Generate from a loaded model: `generate()` for one prompt, or `start()`/`step()` for many at once."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_batch: int = 1, context: int | None = None,
                 threads: int | None = None, prefill_chunk: int = 512, kv_dtype: torch.dtype = torch.float32,
                 fuse: bool = True, prefill_attention_dtype: torch.dtype | None = None, native: bool = True,
                 int8_activations: bool = False):
        """`prefill_attention_dtype`: dtype of prompt attention; None picks bf16 (2.5-3x faster here) when the
        model has quantized layers, which already compute in bf16, and float32 for a float model.
        `native`: decode with the compiled whole-step kernel where it applies (False: torch ops only);
        `int8_activations`: in it, int8 activations for integer-code weights (faster; not float32-exact)."""
        if max_batch < 1:
            raise LowbitError(f"max batch must be >= 1 (got {max_batch})")
        if prefill_chunk < 1:
            raise LowbitError(f"prefill chunk must be >= 1 (got {prefill_chunk})")
        self.threads = set_threads(threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        model_limit = getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        if context is not None and context < 2:
            raise LowbitError(f"context must be >= 2 tokens (got {context})")
        self.context = min(context or DEFAULT_CONTEXT, model_limit)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_token_ids(model, tokenizer)
        if prefill_attention_dtype is None:
            quantized = any(isinstance(m, QuantLinear) for m in model.modules())
            prefill_attention_dtype = gemm_dtype() if quantized else torch.float32
        if config.model_type in FAST_PATH_TYPES:
            self.decoder: Any = LlamaFamilyDecoder(model, max_batch, self.context, kv_dtype, fuse,
                                                   prefill_attention_dtype, native, int8_activations)
        else:
            self.decoder = HFDecoder(model, max_batch, self.context)
        source = getattr(model, "lowbit_source_file", None)
        if source is not None:
            # Pages touched while loading need not stay resident: the kernels read GGUF blocks in place, so the
            # ones they use come back from the page cache on the first step.
            source.release_pages()
        release_freed_heap()
        self.free_slots = list(range(max_batch))
        self.active: list[Sequence] = []
        self.fingerprint = weights_fingerprint(model)
        self.build_options: dict[str, Any] = {}    # engine_for's record of the options it was built with

    def __reduce__(self):
        # A model caches its engine (engine_for). Copying or pickling the model (copy.deepcopy, torch.save) must
        # not copy the cache, whose compiled step holds ctypes pointers into the original's tensors: the copy
        # gets None and builds its own engine when it needs one.
        return _no_engine, ()

    @property
    def fast_path(self) -> bool:
        return isinstance(self.decoder, LlamaFamilyDecoder)

    # -- request lifecycle ----------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: SequenceType[int]) -> None:
        """Raise LowbitError if the prompt is empty or leaves no room in the context for one new token."""
        if len(prompt_ids) == 0:
            raise LowbitError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context:
            raise LowbitError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.context} "
                              f"(including at least one generated token); shorten the prompt or raise the context")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise LowbitError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {vocab})")

    def start(self, prompt_ids: SequenceType[int], params: SamplingParams, stop_on_eos: bool = True) -> Sequence:
        """Prefill a new sequence into a free slot and sample its first token (in `sequence.generated`).

        Generation stops at `params.stop_token_ids`, at the model's EOS ids when `stop_on_eos`, at
        `params.max_new_tokens`, or when the context is full (finish_reason "length").
        """
        params.validate()
        self.check_prompt(prompt_ids)
        if not self.free_slots:
            raise LowbitError(f"all {self.max_batch} batch slots are busy")
        seq = Sequence([int(t) for t in prompt_ids], params, stop_on_eos=stop_on_eos)
        seq.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                      else int.from_bytes(os.urandom(8), "little") >> 1)
        seq.slot = self.free_slots.pop(0)
        began = time.perf_counter()
        try:
            logits = self._prefill(seq)
        except BaseException:
            self.free_slots.insert(0, seq.slot)
            self.free_slots.sort()
            raise
        seq.prefill_seconds = time.perf_counter() - began
        self.active.append(seq)
        self._accept(seq, sample_token(logits, params, seq.generator))
        return seq

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        ids = seq.prompt_ids
        logits = None
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[begin:begin + self.prefill_chunk]], dtype=torch.long)
            logits = self.decoder.forward(chunk, slice(seq.slot, seq.slot + 1), torch.tensor([begin]))
            seq.position = begin + chunk.shape[1]
        return logits[0]

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        params = seq.params
        if (token in self.eos_ids and seq.stop_on_eos) or token in params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= params.max_new_tokens or seq.position + 1 >= self.context:
            seq.finish_reason = "length"

    def step(self) -> list[Sequence]:
        """Decode one token for every unfinished active sequence together; returns the sequences stepped."""
        running = [s for s in self.active if not s.finished]
        if not running:
            return []
        if not self.fast_path:
            for s in running:
                logits = self.decoder.forward(torch.tensor([[s.generated[-1]]]), slice(s.slot, s.slot + 1),
                                              torch.tensor([s.position]))
                s.position += 1
                self._accept(s, sample_token(logits[0], s.params, s.generator))
            return running
        logits = self.decoder.decode(torch.tensor([s.generated[-1] for s in running]),
                                     torch.tensor([s.slot for s in running]),
                                     torch.tensor([s.position for s in running]))
        for row, s in enumerate(running):
            s.position += 1
            self._accept(s, sample_token(logits[row], s.params, s.generator))
        return running

    def release(self, seq: Sequence, reason: str | None = None) -> None:
        """Free the sequence's slot (marking it finished with `reason` if it was still running)."""
        if seq.finish_reason is None:
            seq.finish_reason = reason or "cancelled"
        if seq in self.active:
            self.active.remove(seq)
            if isinstance(self.decoder, HFDecoder):
                self.decoder.release(seq.slot)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    # -- one prompt -------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: SequenceType[int], params: SamplingParams, stop_on_eos: bool = True
                 ) -> Iterator[int]:
        """Stream the generated token ids for one prompt (EOS and stop tokens are yielded, then it stops)."""
        seq = self.start(prompt_ids, params, stop_on_eos)
        try:
            yield seq.generated[-1]
            while not seq.finished:
                self.step()
                yield seq.generated[-1]
        finally:
            self.release(seq)

    @torch.inference_mode()
    def logits(self, token_ids: SequenceType[int]) -> torch.Tensor:
        """Logits [len, vocab] for every position of `token_ids`, computed through the engine's cache path."""
        self.check_prompt(list(token_ids)[:-1] or list(token_ids))
        slot = self.free_slots[0] if self.free_slots else None
        if slot is None:
            raise LowbitError("all batch slots are busy")
        out = []
        ids = list(token_ids)
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[begin:begin + self.prefill_chunk]], dtype=torch.long)
            out.append(self.decoder.forward(chunk, slice(slot, slot + 1), torch.tensor([begin]), all_logits=True)[0])
        if isinstance(self.decoder, HFDecoder):
            self.decoder.release(slot)
        return torch.cat(out)


def weights_fingerprint(model: nn.Module) -> tuple:
    """Identity and version of every weight, so an engine built on fused copies notices in-place changes
    (quantizing the model after generating from it must not keep running the old weights)."""
    marks = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            marks.append((id(module), id(module.qweight), module.kernel_preference))
        elif isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D":
            marks.append((id(module), module.weight.data_ptr(), module.weight._version))
    return tuple(marks)


def _no_engine() -> None:
    return None


def engine_for(model: nn.Module, tokenizer: Any = None, context: int | None = None, max_batch: int = 1,
               threads: int | None = None) -> Engine:
    """The engine cached on `model`, rebuilt only when a larger context or batch is asked for."""
    set_threads(threads)
    engine = getattr(model, "_lowbit_engine", None)
    wanted = context or DEFAULT_CONTEXT
    limit = getattr(model.config, "max_position_embeddings", None) or wanted
    # `lowbit_engine_options` on the model: Engine keywords its owner chose (e.g. the CLI's --int8-activations)
    options = dict(getattr(model, "lowbit_engine_options", {}))
    if (engine is None or engine.context < min(wanted, limit) or engine.max_batch < max_batch or engine.active
            or engine.fingerprint != weights_fingerprint(model) or engine.build_options != options):
        engine = None
        model._lowbit_engine = None      # free the old cache before allocating the new one
        engine = Engine(model, tokenizer, max_batch=max_batch, context=wanted, **options)
        engine.build_options = options
        model._lowbit_engine = engine
    return engine


def engine_generate_ids(model: nn.Module, input_ids: torch.Tensor, params: SamplingParams, stats: Any = None
                        ) -> Iterator[int]:
    """`lowbit.engine.generate.generate_ids` on lowbit's engine: same arguments, same stops, same stats."""
    params.validate()
    ids = [int(t) for t in input_ids.reshape(-1)]
    needed = len(ids) + params.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and needed > limit:
        raise LowbitError(f"prompt ({len(ids)} tokens) + {params.max_new_tokens} new tokens exceeds the "
                          f"model's context of {limit}; shorten the prompt or lower -n")
    engine = engine_for(model, context=max(needed, DEFAULT_CONTEXT))
    if stats is not None:
        stats.prompt_tokens = len(ids)
    seq = engine.start(ids, params, stop_on_eos=False)
    try:
        if stats is not None:
            stats.prompt_seconds = seq.prefill_seconds
        began = time.perf_counter()
        while True:
            token = seq.generated[-1]
            if stats is not None:
                stats.token_ids.append(token)
                stats.new_tokens += 1
                stats.decode_seconds = time.perf_counter() - began
            yield token
            if seq.finished:
                break
            if len(seq.generated) == 1:
                began = time.perf_counter()   # decode time starts after the first (prefill) token
            engine.step()
    finally:
        engine.release(seq)


def supports_engine(model: nn.Module) -> bool:
    """True when lowbit's fast decoder runs this model's architecture."""
    return getattr(getattr(model, "config", None), "model_type", None) in FAST_PATH_TYPES
