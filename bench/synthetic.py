"""Synthetic GGUF models of real shapes with random weights, for speed and memory benchmarks.

For speed and memory only the shapes and the block types matter, not the values, so a model of Llama-3-8B's
shape can be written in a minute instead of being quantized for an hour. Blocks are random bytes with their
float16 scale fields overwritten by small finite values (random bytes would hold NaNs and infinities, which
change what the arithmetic costs); norms are ones. Tensor types follow llama.cpp's rules for the mix
(lowbit.formats.gguf_mixes.TypePlanner, the same planner lowbit's GGUF export uses), so a synthetic Q4_K_M has
the Q6_K attn_v / ffn_down layers and the Q6_K head a real one has.

The files are written tensor by tensor (gguf-py's streaming writer), so an 8B model needs little memory. They are
generated at bench time into a cache folder and never committed.

    python bench/synthetic.py llama-3.2-1b Q4_K_M out.gguf
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Real model shapes (from their config.json files).
@dataclass(frozen=True)
class Shape:
    arch: str             # GGUF architecture
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    rope_base: float = 500000.0
    context: int = 8192

    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        block = attn + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True, rope_base=1e6),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True, rope_base=1e6),
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, True),
    "llama-3.2-3b": Shape("llama", 3072, 28, 24, 8, 8192, 128256, True),
    "llama-3-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256, False),
}

# Byte offsets of each block type's float16 scale fields inside one block (ggml-common.h's block structs).
_F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def tensor_list(shape: Shape) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(GGUF tensor name, HF-order shape) in llama.cpp's file order."""
    head_dim = shape.hidden // shape.heads
    out: list[tuple[str, tuple]] = [("token_embd.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        b = f"blk.{i}"
        out += [(f"{b}.attn_norm.weight", (shape.hidden,)),
                (f"{b}.attn_q.weight", (shape.heads * head_dim, shape.hidden)),
                (f"{b}.attn_k.weight", (shape.kv_heads * head_dim, shape.hidden)),
                (f"{b}.attn_v.weight", (shape.kv_heads * head_dim, shape.hidden))]
        if shape.qkv_bias:
            out += [(f"{b}.attn_q.bias", (shape.heads * head_dim,)), (f"{b}.attn_k.bias", (shape.kv_heads * head_dim,)),
                    (f"{b}.attn_v.bias", (shape.kv_heads * head_dim,))]
        out += [(f"{b}.attn_output.weight", (shape.hidden, shape.heads * head_dim)),
                (f"{b}.ffn_norm.weight", (shape.hidden,)),
                (f"{b}.ffn_gate.weight", (shape.ffn, shape.hidden)),
                (f"{b}.ffn_up.weight", (shape.ffn, shape.hidden)),
                (f"{b}.ffn_down.weight", (shape.hidden, shape.ffn))]
    out.append(("output_norm.weight", (shape.hidden,)))
    if not shape.tied:
        out.append(("output.weight", (shape.vocab, shape.hidden)))
    return out


def random_blocks(type_name: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] uint8 of random blocks with finite small scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, columns // block, type_size), dtype=np.uint8)
    scale = (rng.uniform(0.5, 1.5, size=(rows, columns // block)) * 2e-3).astype(np.float16)
    for offset in _F16_FIELDS[type_name]:
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(rows, columns // block, 2)
    return blocks.reshape(rows, -1)


def _vocab_metadata(writer, vocab: int) -> None:
    """A placeholder SentencePiece-style vocabulary (benchmarks feed token ids, never text)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_synthetic_gguf(path: str | Path, shape_name: str, mix: str = "Q4_K_M", seed: int = 0,
                         progress: bool = True) -> Path:
    """Write a random-weight GGUF of `shape_name` (SHAPES) with `mix`'s tensor types; returns the path."""
    import gguf

    from lowbit.formats.gguf_mixes import TypePlanner

    shape = SHAPES[shape_name]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    planner = TypePlanner(mix, shape.layers, shape.heads, shape.kv_heads, shape.tied)
    plan = [(name, dims, planner.type_for(name, dims)) for name, dims in tensor_list(shape)]

    tmp = path.with_suffix(path.suffix + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), shape.arch)
    writer.add_name(f"synthetic {shape_name} {mix}")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(1)
    _vocab_metadata(writer, shape.vocab)
    for name, dims, type_name in plan:
        if type_name in ("F32", "F16"):
            dtype = np.float32 if type_name == "F32" else np.float16
            writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
        else:
            qtype = gguf.GGMLQuantizationType[type_name]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = dims[0] * dims[1] // block * type_size
            writer.add_tensor_info(name, (dims[0], dims[1] // block * type_size), np.dtype(np.uint8), nbytes,
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (name, dims, type_name) in enumerate(plan):
        if type_name in ("F32", "F16"):
            if name.endswith("norm.weight"):
                data = np.ones(dims, dtype=np.float32)
            else:
                data = (rng.standard_normal(dims, dtype=np.float32) * 0.02)
            data = data.astype(np.float32 if type_name == "F32" else np.float16)
        else:
            data = random_blocks(type_name, dims[0], dims[1], rng)
        writer.write_tensor_data(data)
        if progress and (index % 50 == 0 or index == len(plan) - 1):
            print(f"\r  writing {path.name}: {index + 1}/{len(plan)} tensors", end="", file=sys.stderr, flush=True)
    writer.close()
    if progress:
        print(file=sys.stderr)
    tmp.replace(path)
    return path


# lowbit's own layouts of a synthetic shape: the integer grid lowbit's RTN/GPTQ/AWQ produce, written by lowbit's own
# writers (the format decides the bytes); codes and scales are random, as for the GGUF files above.
LOWBIT_LAYOUTS = {"rtn4": ("lowbit", 4, 128), "gptq4": ("gptq", 4, 128)}


def hf_config(shape: Shape):
    """The transformers config of a synthetic shape (Llama or Qwen2)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn, vocab_size=shape.vocab,
                  tie_word_embeddings=shape.tied, rope_theta=shape.rope_base, max_position_embeddings=shape.context,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return Qwen2Config(**common) if shape.arch == "qwen2" else LlamaConfig(**common)


def write_synthetic_lowbit(path: str | Path, shape_name: str, layout: str = "rtn4", seed: int = 0,
                           progress: bool = True, float_dtype: str = "bfloat16") -> Path:
    """A random-weight model of `shape_name` quantized to `layout` (LOWBIT_LAYOUTS: a symmetric integer grid
    with groups) and saved by lowbit's writer for that format; returns the folder. Linear layers are installed
    one at a time into an empty model, so memory holds the codes once (one byte each) plus the float tables.
    `float_dtype`: the dtype the random float tensors come from, as a real checkpoint's (Qwen2.5 and Llama 3.2
    are published in bfloat16): their values are that dtype's, and lowbit's writer stores embedding and head in
    it (models/float_dtype.py)."""
    import torch

    from lowbit.formats.registry import get_writer
    from lowbit.models.loading import empty_model_from_config
    from lowbit.quantized import QuantizedWeight
    from lowbit.runtime.surgery import install_quantized
    from lowbit.schemes.intgrid import IntGrid

    shape = SHAPES[shape_name]
    fmt, bits, group = LOWBIT_LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    model = empty_model_from_config(hf_config(shape))
    scheme = IntGrid(bits=bits, group_size=group, symmetric=True)
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    for index, name in enumerate(linears):
        n, k = model.get_submodule(name).weight.shape
        codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=generator)
        scales = (torch.rand(n, -(-k // group), generator=generator) * 2e-3 + 1e-3).half().float()
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
        install_quantized(model, name, QuantizedWeight(scheme, (n, k), codes, scales, zeros, group_size=group))
        if progress and (index % 20 == 0 or index == len(linears) - 1):
            print(f"\r  quantizing {shape_name}: {index + 1}/{len(linears)} layers", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    from lowbit.models.float_dtype import FLOAT_DTYPES

    if float_dtype not in FLOAT_DTYPES:
        raise SystemExit(f"float dtype {float_dtype!r} unknown: use one of {', '.join(FLOAT_DTYPES)}")
    source = FLOAT_DTYPES[float_dtype]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name
                        else (torch.randn(param.shape, generator=generator) * 0.02).to(source).float())
    model.lowbit_source_dtype = source
    model.tie_weights()      # a tied head shares the embedding (the skeleton's two tensors are separate)
    return get_writer(fmt).save(model, None, Path(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("mix", help="Q4_0, Q4_K_M, Q8_0, ...")
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_synthetic_gguf(args.output, args.shape, args.mix, args.seed)


if __name__ == "__main__":
    main()
