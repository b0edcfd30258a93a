"""One validation layer between model files and the kernels: every loader asks here before it builds or fills a
model, so a damaged or inconsistent checkpoint is a one-line LowbitError naming the problem, never a crash in C, a
huge allocation, a silently dropped layer or randomly initialised weights.

- `check_hparams(values, source)`: hyper-parameters (config.json keys, also those a GGUF's metadata becomes) are
  integers within bounds no real model exceeds, checked before anything is allocated.
- `expected_tensors(model)` / `check_tensor_set(expected, present, source)`: the architecture's tensors (names and
  shapes from the skeleton transformers builds for the config, i.e. the family declared in lowbit/models/arch)
  against the tensors a file holds: missing, unexpected and misshapen tensors are errors naming them.
- `check_float_tensor` / `check_integer_tensor`: dtypes of stored tensors (a GPTQ qweight stored as float is not
  a checkpoint lowbit can trust).
- `check_quantized_weight(name, qw, shape)`: a QuantizedWeight's codes, statistics and column groups agree with
  the Linear it replaces (called by runtime.surgery.install_quantized, the one place quantized layers enter a
  model).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

from lowbit.errors import CorruptFile, LowbitError

# config.json keys (several spellings across families) -> (what they mean, the largest value accepted). The bounds
# are far above any released model (Llama 3.1 405B: 126 layers, 128 heads, 16384 hidden, 53248 intermediate,
# 128k vocab and context) and far below what would make a skeleton allocate more than the machine has.
HPARAM_LIMITS: dict[str, tuple[str, int]] = {}
for _keys, _meaning, _limit in (
    (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), "layers", 1024),
    (("num_attention_heads", "n_head", "num_heads"), "attention heads", 4096),
    (("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"), "key-value heads", 4096),
    (("hidden_size", "n_embd", "d_model", "dim"), "hidden size", 1 << 17),
    (("head_dim",), "head dimension", 1 << 14),
    (("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size"),
     "intermediate size", 1 << 20),
    (("vocab_size",), "vocabulary size", 1 << 22),
    (("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), "context length", 1 << 24),
    (("num_local_experts", "num_experts"), "experts", 1 << 12),
    (("num_experts_per_tok",), "experts per token", 1 << 12),
    (("sliding_window",), "sliding window", 1 << 24),
):
    for _key in _keys:
        HPARAM_LIMITS[_key] = (_meaning, _limit)
# values that may legitimately be 0 or null (no window, no experts)
OPTIONAL_ZERO = {"sliding_window", "num_local_experts", "num_experts", "num_experts_per_tok",
                 "shared_expert_intermediate_size", "moe_intermediate_size"}


def check_hparams(values: Mapping[str, Any], source: Any) -> None:
    """Every bounded hyper-parameter in `values` (a config.json dict, its text_config, or the config kwargs a GGUF's
    metadata becomes) is an integer from 1 to its limit; key-value heads divide the attention heads."""
    if not isinstance(values, Mapping):
        raise CorruptFile(f"{source}: the configuration is {type(values).__name__}, not a JSON object")
    for key, value in values.items():
        if key in ("text_config", "llm_config") and isinstance(value, Mapping):
            check_hparams(value, source)
            continue
        if key not in HPARAM_LIMITS:
            continue
        meaning, limit = HPARAM_LIMITS[key]
        optional = key in OPTIONAL_ZERO
        if value is None:        # not given: transformers derives it (GPT-2's n_inner = 4 x hidden) or refuses
            continue
        items = value if isinstance(value, list) and key == "intermediate_size" else [value]  # per-layer lists
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise CorruptFile(f"{source}: {key} ({meaning}) is {item!r}, not an integer; fix the configuration "
                                  "or re-download the model")
            if not (0 if optional else 1) <= item <= limit:
                raise CorruptFile(f"{source}: {key} ({meaning}) is {item}, outside 1..{limit}; the configuration "
                                  "is corrupt")
    heads, kv_heads = _first(values, "num_attention_heads", "n_head"), _first(values, "num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and not isinstance(kv_heads, bool) and heads % kv_heads:
        raise CorruptFile(f"{source}: {heads} attention heads are not a multiple of {kv_heads} key-value heads; "
                          "the configuration is corrupt")


def _first(values: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if values.get(key) is not None:
            return values[key]
    return None


def config_json_values(config: Any) -> dict[str, Any]:
    """The hyper-parameters of a transformers config object, as the dict check_hparams reads."""
    values = {key: getattr(config, key) for key in HPARAM_LIMITS if hasattr(config, key)}
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        values["text_config"] = config_json_values(text)
    return values


# -- the tensor set -------------------------------------------------------------------------------------------
def name_list(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def expected_tensors(model: Any) -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of every tensor the model's architecture holds (its parameters and persistent
    buffers), from a skeleton (meta or empty) built for the config."""
    out = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True))
    out.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return out


def check_tensor_set(expected: Mapping[str, tuple[int, ...]], present: Mapping[str, tuple[int, ...]], source: Any,
                     optional: Iterable[str] = (), what: str = "the model's architecture") -> None:
    """The tensors a file holds (`present`: name -> shape) are exactly those `expected` (name -> shape), apart from
    `optional` names (tied heads, non-persistent buffers) that may be absent; each difference is named."""
    optional = set(optional)
    missing = set(expected) - set(present) - optional
    unexpected = set(present) - set(expected)
    if missing:
        raise CorruptFile(f"{source}: tensors missing for {what}: {name_list(missing)}; the file is incomplete or does "
                          "not match its configuration")
    if unexpected:
        raise CorruptFile(f"{source}: tensors {what} does not have: {name_list(unexpected)}; the file does not match "
                          "its configuration (layer or expert count changed?)")
    wrong = {name: (tuple(present[name]), tuple(shape)) for name, shape in expected.items()
             if name in present and tuple(present[name]) != tuple(shape)}
    if wrong:
        name, (have, need) = sorted(wrong.items())[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise CorruptFile(f"{source}: tensor {name} has shape {list(have)}, but the configuration's hyper-parameters "
                          f"(heads, head_dim, hidden, intermediate, vocab) need {list(need)}{more}")


def check_float_tensor(name: str, tensor: Any, source: Any) -> None:
    if not tensor.is_floating_point():
        raise CorruptFile(f"{source}: tensor {name} is stored as {str(tensor.dtype).replace('torch.', '')}, "
                          "not a floating-point type; the checkpoint is corrupt")


def check_not_bool(name: str, tensor: Any, source: Any) -> None:
    import torch

    if tensor.dtype == torch.bool:
        raise CorruptFile(f"{source}: tensor {name} is stored as bool, which holds no statistics; the checkpoint is "
                          "corrupt")


def check_integer_tensor(name: str, tensor: Any, source: Any, dtypes: tuple = ()) -> None:
    """`tensor` holds integers (of one of `dtypes`, when given): packed codes, zero points and group indices."""
    import torch

    bad = tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool
    if bad or (dtypes and tensor.dtype not in dtypes):
        names = "/".join(str(d).replace("torch.", "") for d in dtypes) or "an integer type"
        raise CorruptFile(f"{source}: tensor {name} is stored as {str(tensor.dtype).replace('torch.', '')}, not "
                          f"{names}; the checkpoint is corrupt")


def check_state(model: Any, tensors: Mapping[str, Any], source: Any, skip_prefixes: Iterable[str] = (),
                optional: Iterable[str] = ()) -> None:
    """The tensors left to load into `model` by name, once the loader has taken the quantized layers' own
    (`skip_prefixes`), are exactly the architecture's other tensors, with its shapes and a floating dtype where
    the parameter is floating; a leftover under a quantized layer's name is unexpected too."""
    prefixes = tuple(f"{p}." for p in skip_prefixes)
    expected = {n: s for n, s in expected_tensors(model).items() if not n.startswith(prefixes)}
    present = {n: tuple(t.shape) for n, t in tensors.items()}
    check_tensor_set(expected, present, source, optional=set(optional) | _tied_or_buffer_names(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in tensors.items():
        if name in params and params[name].is_floating_point():
            check_float_tensor(name, tensor, source)


def _tied_or_buffer_names(model: Any) -> set[str]:
    """Tensors a checkpoint may leave out: a tied output head (stored once as the embedding) and buffers that
    transformers recomputes (rotary inverse frequencies)."""
    out = {name for name, _ in model.named_buffers()}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
        out |= {f"{n}.weight" for n, m in model.named_modules() if m is head and head is not None}
    return out


# -- quantized layers -------------------------------------------------------------------------------------------
def check_quantized_weight(name: str, qw: Any, shape: tuple[int, int] | None, source: Any = None) -> None:
    """A QuantizedWeight fits the layer it replaces (`shape` [out, in]) and is internally consistent: stored codes
    [out, in] of an integer type, statistics [out, groups], g_idx [in] naming existing groups."""
    import torch

    where = f"{source}: layer {name}" if source is not None else f"layer {name}"
    qshape = tuple(int(d) for d in qw.shape)
    if len(qshape) != 2 or min(qshape) <= 0:
        raise CorruptFile(f"{where}: quantized weight shape {list(qshape)} is not [out, in]")
    if shape is not None and qshape != tuple(shape):
        raise CorruptFile(f"{where} holds a {list(qshape)} weight, and the model's layer is {list(shape)}; the "
                          "checkpoint does not match its configuration")
    n, k = qshape
    group = qw.effective_group_size
    if not isinstance(group, int) or group <= 0:
        raise CorruptFile(f"{where}: group size {qw.group_size!r} is not a positive integer")
    if getattr(qw.scheme, "derives_codes", False) and qw.extra:
        return          # codes are derived from the file's blocks, whose size the GGUF parser checked
    stored = qw.__dict__
    codes, scales, zeros = stored.get("_codes"), stored.get("_scales"), stored.get("_zeros")
    if codes is not None:
        check_integer_tensor(f"{name} codes", codes, source or "checkpoint")
        if codes.dim() == 2 and tuple(codes.shape) != qshape:
            raise CorruptFile(f"{where}: codes have shape {list(codes.shape)}, not {list(qshape)}")
    n_groups = -(-k // group)
    if qw.g_idx is not None:
        g_idx = qw.g_idx
        check_integer_tensor(f"{name}.g_idx", g_idx, source or "checkpoint")
        if tuple(g_idx.shape) != (k,):
            raise CorruptFile(f"{where}: g_idx has shape {list(g_idx.shape)}, not [{k}]")
        if k and (int(g_idx.min()) < 0 or (scales is not None and int(g_idx.max()) >= scales.shape[-1])):
            raise CorruptFile(f"{where}: g_idx names groups outside the stored scales")
        n_groups = None    # act-order: the scales' width is the number of groups
    from lowbit.schemes.intgrid import IntGrid

    per_row_groups = isinstance(qw.scheme, IntGrid)   # other schemes lay statistics out their own way (bnb blocks)
    if per_row_groups and _grid_group(qw.scheme.group_size, k) != _grid_group(qw.group_size, k):
        # sizes giving the same number of groups (32 and 33 on 64 columns) fit the same statistics but map the
        # columns to groups differently: the layer's size must be its scheme's, the one its codes were made with
        raise CorruptFile(f"{where}: group size {qw.group_size} is not its scheme's ({qw.scheme.group_size}); the "
                          "checkpoint's settings do not match each other")
    for what, stats in (("scales", scales), ("zeros", zeros)):
        if stats is None or not isinstance(stats, torch.Tensor):
            continue
        if per_row_groups and (stats.dim() != 2 or stats.shape[0] != n
                               or (n_groups is not None and stats.shape[1] != n_groups)):
            need = f"[{n}, {n_groups}]" if n_groups is not None else f"[{n}, groups]"
            raise CorruptFile(f"{where}: {what} have shape {list(stats.shape)}, not {need}")
        if stats.is_floating_point() and not bool(torch.isfinite(stats).all()):
            raise CorruptFile(f"{where}: {what} hold NaN or infinite values; the checkpoint is corrupt")
    if per_row_groups and zeros is None:     # integer grids decode (q - zero) * scale, symmetric ones too
        raise CorruptFile(f"{where}: the integer grid has no zero points; the checkpoint is incomplete")
    if per_row_groups and qw.scheme.symmetric and isinstance(zeros, torch.Tensor) and zeros.numel():
        middle = float((qw.scheme.maxq + 1) // 2)       # the one zero point of a symmetric grid
        if not bool((zeros == middle).all()):
            raise CorruptFile(f"{where}: the grid is symmetric but its zero points are not all {middle:g}; the "
                              "checkpoint's settings (sym, checkpoint_format) do not match its tensors")


def _grid_group(group_size: Any, k: int) -> Any:
    """The columns per group an integer grid's group size means on `k` inputs (0 whole tensor, -1 per channel:
    one group of all k; a size of k or more: one group too)."""
    return k if group_size in (-1, 0, None) else min(group_size, k) if isinstance(group_size, int) else group_size


def module_weight_shape(module: Any) -> tuple[int, int] | None:
    """[out, in] of the Linear-like module (or embedding [vocab, hidden]) a quantized weight replaces."""
    from lowbit.models.arch.base import linear_weight

    qweight = getattr(module, "qweight", None)
    if qweight is not None:
        return tuple(qweight.shape)
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    try:
        w = linear_weight(module)
    except AttributeError:
        w = weight
    return tuple(w.shape) if w.dim() == 2 else None



def check_state_tensor(module: Any, attribute: str, tensor: Any, source: Any, name: str) -> None:
    """A tensor about to become `module.attribute` (a quantized layer's bias) has the shape of the one it replaces
    and a floating dtype."""
    current = getattr(module, attribute, None)
    need = tuple(current.shape) if current is not None else (module_weight_shape(module) or (None,))[:1]
    if tuple(tensor.shape) != tuple(need):
        raise CorruptFile(f"{source}: {name}.{attribute} has shape {list(tensor.shape)}, not {list(need)}")
    check_float_tensor(f"{name}.{attribute}", tensor, source)


@contextlib.contextmanager
def layer_errors(source: Any, name: str):
    """Turn what a scheme or format raises for tensors that do not fit together (KeyError for a missing part,
    shape and dtype errors from torch) into one CorruptFile naming the layer; LowbitErrors pass unchanged."""
    try:
        yield
    except LowbitError as exc:
        if name in str(exc):
            raise
        raise type(exc)(f"{source}: quantized layer {name}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError, ZeroDivisionError,
            AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFile(f"{source}: quantized layer {name} cannot be rebuilt from its tensors and settings "
                          f"({type(exc).__name__}: {detail[:200]}); the checkpoint is corrupt") from None


# the tensor names lowbit's schemes store per quantized layer (Scheme.to_tensors), besides extra.*
SCHEME_TENSOR_NAMES = frozenset({"codes", "scales", "zeros", "g_idx", "blocks", "CB", "SCB"})


def check_part_names(name: str, parts: Iterable[str], allowed: Iterable[str], source: Any,
                     allowed_prefix: str | None = None) -> None:
    """A quantized layer's stored tensors (names without the layer prefix) are among those its format writes
    (`allowed`, or any name starting with `allowed_prefix`)."""
    unknown = sorted(p for p in parts if p not in set(allowed)
                     and not (allowed_prefix and p.startswith(allowed_prefix)))
    if unknown:
        raise CorruptFile(f"{source}: quantized layer {name} has tensors its format does not store: "
                          f"{name_list(f'{name}.{p}' for p in unknown)}; the checkpoint is corrupt")


# -- headers only: a GGUF's tensors against its metadata, without torch ------------------------------------------
# `lowbit inspect` must describe a file in constant time and memory, so it cannot build the transformers skeleton
# the loaders compare a file with (expected_tensors / gguf_import.check_gguf_tensors). llama.cpp's own tensor
# roles say the same from the metadata alone: every family lowbit exports names its tensors by them, and
# tests/test_inspect.py checks, for every family, that these shapes are exactly the skeleton's.

# GGUF metadata key (after the architecture prefix) -> the config.json key check_hparams bounds it as
GGUF_HPARAM_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.value_length": "head_dim", "context_length":
    "max_position_embeddings", "vocab_size": "vocab_size", "expert_count": "num_experts", "expert_used_count":
    "num_experts_per_tok", "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size", "attention.sliding_window":
    "sliding_window",
}
# llama.cpp families whose ffn_up holds gate and up stacked (twice the feed-forward width)
FUSED_GATE_UP = {"phi3"}


def check_gguf_hparams(metadata: Mapping[str, Any], source: Any) -> dict[str, Any]:
    """The architecture's hyper-parameters in a GGUF's metadata, bounded as check_hparams bounds config.json (a
    block_count of 2**32 - 1 is refused before anything counts to it); returns them without the prefix."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CorruptFile(f"{source}: general.architecture is {arch!r}, not a name; the file is corrupt")
    prefix = f"{arch}."
    meta = {key[len(prefix):]: value for key, value in metadata.items() if key.startswith(prefix)}
    for key, config_key in GGUF_HPARAM_KEYS.items():
        if key in meta:
            # per-layer arrays (some families vary heads by layer) are bounded item by item
            for item in (meta[key] if isinstance(meta[key], (list, tuple)) else [meta[key]]):
                check_hparams({config_key: item}, f"{source}: {prefix}{key}")
    heads, kv = meta.get("attention.head_count"), meta.get("attention.head_count_kv")
    check_hparams({"num_attention_heads": heads, "num_key_value_heads": kv} if _ints(heads, kv) else {}, source)
    return meta


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def gguf_expected_shapes(metadata: Mapping[str, Any], names: Iterable[str], source: Any
                         ) -> dict[str, tuple[int, ...]]:
    """{tensor name: the shape (PyTorch order) its llama.cpp role and the metadata's hyper-parameters give, None
    for a size the metadata does not say} for each of `names` whose role is known; after check_gguf_hparams, so
    every count is bounded."""
    arch = metadata["general.architecture"]
    meta = {key[len(arch) + 1:]: value for key, value in metadata.items() if key.startswith(f"{arch}.")}
    embd, heads = meta.get("embedding_length"), meta.get("attention.head_count")
    kv = meta.get("attention.head_count_kv", heads)
    k_len = meta.get("attention.key_length", embd // heads if _ints(embd, heads) else None)
    v_len = meta.get("attention.value_length", k_len)
    rot = meta.get("rope.dimension_count", k_len)
    ff = meta.get("feed_forward_length")
    experts = meta.get("expert_count")
    ff_exp = meta.get("expert_feed_forward_length", ff)
    # without its own key the shared expert is feed_forward_length wide (Qwen2-MoE), except in families that count
    # their shared experts (DeepSeek: expert_shared_count x expert width): unknown there, not a wrong guess
    ff_shexp = meta.get("expert_shared_feed_forward_length", None if "expert_shared_count" in meta else ff)
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = meta.get("vocab_size", len(tokens) if isinstance(tokens, (list, tuple)) else None)
    q_rows = heads * k_len if _ints(heads, k_len) else None
    k_rows = kv * k_len if _ints(kv, k_len) else None
    v_rows = kv * v_len if _ints(kv, v_len) else None
    up_rows = 2 * ff if arch in FUSED_GATE_UP and _ints(ff) else ff
    roles: dict[str, tuple[Any, ...]] = {     # role -> weight shape [out, in] (experts: [experts, out, in])
        "token_embd": (vocab, embd), "output": (vocab, embd), "position_embd": (meta.get("context_length"), embd),
        "attn_q": (q_rows, embd), "attn_k": (k_rows, embd), "attn_v": (v_rows, embd),
        "attn_qkv": ((q_rows + k_rows + v_rows) if _ints(q_rows, k_rows, v_rows) else None, embd),
        "attn_output": (embd, heads * v_len if _ints(heads, v_len) else None),
        "attn_q_norm": (k_len,), "attn_k_norm": (k_len,),
        "ffn_gate": (ff, embd), "ffn_up": (up_rows, embd), "ffn_down": (embd, ff),
        "ffn_gate_inp": (experts, embd), "ffn_gate_exps": (experts, ff_exp, embd),
        "ffn_up_exps": (experts, ff_exp, embd), "ffn_down_exps": (experts, embd, ff_exp),
        "ffn_gate_shexp": (ff_shexp, embd), "ffn_up_shexp": (ff_shexp, embd), "ffn_down_shexp": (embd, ff_shexp),
        "ffn_gate_inp_shexp": (1, embd),
        "rope_freqs": (rot // 2 if _ints(rot) else None,),     # one divisor per rotary frequency (Llama 3.x)
    }
    for norm in ("token_embd_norm", "output_norm", "attn_norm", "attn_norm_2", "ffn_norm", "post_attention_norm",
                 "post_ffw_norm", "attn_post_norm", "ffn_post_norm"):
        roles[norm] = (embd,)
    out = {}
    for name in names:
        stem, _, kind = name.rpartition(".")
        role = stem.split(".", 2)[2] if stem.startswith("blk.") and stem.count(".") >= 2 else stem
        shape = roles.get(role)
        if shape is None or kind not in ("weight", "bias"):
            continue
        if kind == "bias" and len(shape) > 1:      # a bias has its weight's rows (a norm's bias its width)
            shape = shape[:-1]
        if any(_ints(d) for d in shape):
            out[name] = tuple(d if _ints(d) else None for d in shape)
    return out


def shape_agrees(have: Iterable[Any], need: Iterable[Any]) -> bool:
    """Two shapes agree where both say a size (None: not known)."""
    have, need = tuple(have), tuple(need)
    return len(have) == len(need) and all(h is None or n is None or h == n for h, n in zip(have, need))


def _shown(shape: Iterable[Any]) -> list[Any]:
    return [d if d is not None else "?" for d in shape]


def check_gguf_header(gf: Any) -> None:
    """A parsed GGUF's hyper-parameters are bounded and agree with its tensors: blocks 0..block_count-1 all present
    and no other, the vocabulary and width of token_embd, and every tensor of a known llama.cpp role shaped as the
    heads, head sizes, widths and expert counts say (what the loaders check on the skeleton, from headers alone)."""
    meta = check_gguf_hparams(gf.metadata, gf.path)
    blocks = meta.get("block_count")
    indices = {int(name.split(".")[1]) for name in gf.tensors
               if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if _ints(blocks):
        outside = sorted(i for i in indices if i >= blocks)
        if outside:
            raise CorruptFile(f"{gf.path}: tensors blk.{outside[0]}.* are beyond block_count {blocks}; the file "
                              "does not match its metadata (layer count changed?)")
        empty = sorted(set(range(blocks)) - indices)
        if empty:
            raise CorruptFile(f"{gf.path}: block_count is {blocks}, but there are no tensors blk.{empty[0]}.*"
                              f"{f' ({len(empty) - 1} more empty)' if len(empty) > 1 else ''}; the file does not "
                              "match its metadata (layer count changed?)")
    embedding = gf.tensors.get("token_embd.weight")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if embedding is not None and isinstance(tokens, (list, tuple)) and len(tokens) != embedding.shape[0]:
        raise CorruptFile(f"{gf.path}: the tokenizer has {len(tokens)} tokens, and token_embd.weight "
                          f"{embedding.shape[0]} rows; the file is corrupt")
    expected = gguf_expected_shapes(gf.metadata, gf.tensors, gf.path)
    wrong = {name: (tuple(gf.tensors[name].shape), shape) for name, shape in expected.items()
             if not shape_agrees(gf.tensors[name].shape, shape)}
    if wrong:
        name, (have, need) = sorted(wrong.items())[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise CorruptFile(f"{gf.path}: tensor {name} has shape {list(have)}, but the metadata's hyper-parameters "
                          f"(heads, head size, width, feed-forward, vocab, experts) need {_shown(need)}{more}")


# A folder's tensors against its config.json, headers only: Hugging Face module names of the llama-like families
# (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral, Qwen-MoE) -> the llama.cpp role whose shape gguf_expected_shapes
# gives. The names are matched in every family (OPT's q_proj and embed_tokens, GLM's gate_up_proj are checked too);
# names no family here uses are checked for their layer count only.
HF_ROLES = {"embed_tokens": "token_embd", "lm_head": "output", "q_proj": "attn_q", "k_proj": "attn_k",
            "v_proj": "attn_v", "o_proj": "attn_output", "qkv_proj": "attn_qkv", "gate_proj": "ffn_gate",
            "up_proj": "ffn_up", "down_proj": "ffn_down", "gate_up_proj": "ffn_up", "w1": "ffn_gate", "w3": "ffn_up",
            "w2": "ffn_down"}
# config.json keys -> the GGUF metadata keys gguf_expected_shapes reads (first present spelling wins)
CONFIG_TO_GGUF = {"embedding_length": ("hidden_size",), "attention.head_count": ("num_attention_heads",),
                  "attention.head_count_kv": ("num_key_value_heads",), "attention.key_length": ("head_dim",),
                  "feed_forward_length": ("intermediate_size",), "vocab_size": ("vocab_size",),
                  "expert_count": ("num_local_experts", "num_experts"),
                  "expert_feed_forward_length": ("moe_intermediate_size",),
                  "expert_shared_feed_forward_length": ("shared_expert_intermediate_size",)}
LAYER_CONTAINERS = ("layers", "h", "blocks", "block")
# Modules of a multimodal checkpoint that are not its language model (Gemma 3's and LLaVA's vision towers, Qwen2-VL's
# `visual`, their projectors): their layers and q_proj/k_proj/... have the tower's own sizes, not config.json's
# text hyper-parameters, so the headers check leaves them out.
NON_TEXT_MODULES = {"vision_tower", "vision_model", "visual", "audio_tower", "multi_modal_projector"}


def check_folder_header(config: Mapping[str, Any], shapes: Mapping[str, tuple[Any, ...]], source: Any) -> None:
    """config.json's hyper-parameters are bounded (check_hparams) and agree with the tensors a folder's headers
    describe: `shapes` maps each layer's weight name to its logical shape [out, in] (None where the stored form does
    not say); layers 0..num_hidden_layers-1 all present and no other; the llama-like families' projections,
    embedding and head shaped as heads, head_dim, hidden, intermediate, vocab and experts say."""
    check_hparams(config, source)
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    shapes = {name: shape for name, shape in shapes.items() if NON_TEXT_MODULES.isdisjoint(name.split("."))}
    indices = set()
    for name in shapes:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in LAYER_CONTAINERS and parts[i + 1].isdigit():
                indices.add(int(parts[i + 1]))
                break
    if _ints(layers) and indices:
        outside = sorted(i for i in indices if i >= layers)
        empty = sorted(set(range(layers)) - indices)
        if outside or empty:
            what = f"tensors of layer {outside[0]}" if outside else f"no tensors for layer {empty[0]}"
            raise CorruptFile(f"{source}: config.json says {layers} layers, and the weights have {what}; the "
                              "checkpoint does not match its configuration (layer count changed?)")
    arch = str(text.get("model_type") or config.get("model_type") or "hf")
    meta = {"general.architecture": arch}
    for gguf_key, keys in CONFIG_TO_GGUF.items():
        value = _first(text, *keys)
        if value is not None:
            meta[f"{arch}.{gguf_key}"] = value
    # OPT's embedding and head are word_embed_proj_dim wide (project_in/out map them to and from hidden_size)
    embed_width = _first(text, "word_embed_proj_dim")
    roles = {name: role for name in shapes if (role := hf_role(name)) is not None}
    expected = gguf_expected_shapes(meta, set(roles.values()), source)
    for name, role in sorted(roles.items()):
        need = expected.get(role)
        if need is None:
            continue
        need = need[1:] if "_exps." in role else need      # one expert of the stack
        if role in ("token_embd.weight", "output.weight") and _ints(embed_width):
            need = (need[0], embed_width)
        if name.endswith(".gate_up_proj.weight") and arch not in FUSED_GATE_UP and _ints(need[0]):
            need = (2 * need[0], *need[1:])     # gate and up stacked in every family that names it so (GLM-4)
        if not shape_agrees(shapes[name], need):
            raise CorruptFile(f"{source}: tensor {name} has shape {_shown(shapes[name])}, but config.json's "
                              "hyper-parameters (heads, head_dim, hidden, intermediate, vocab, experts) need "
                              f"{_shown(need)}; the checkpoint does not match its configuration")


def hf_role(name: str) -> str | None:
    """The llama.cpp role (as a GGUF tensor name) of a llama-like family's weight `name`, or None."""
    module, _, leaf = name.rpartition(".")
    owner = module.rpartition(".")[2]
    if leaf != "weight" or owner not in HF_ROLES:
        return None
    role = HF_ROLES[owner]
    if owner in ("embed_tokens", "lm_head"):
        return f"{role}.weight"
    if ".shared_expert." in name:
        role += "_shexp"
    elif ".experts." in name:
        role += "_exps"
    return f"blk.0.{role}.weight"
