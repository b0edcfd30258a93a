"""What lowbit knows about one architecture family, as data: the `Architecture` record every family file
declares, and the mechanisms that read it (GGUF tensor names from gguf-py's own tables, fused-projection row
orders, mixture-of-experts unfusing, hyper-parameter maps).

A family file says *what* is true of the family (where its blocks are, which norm and activation it uses,
how AWQ folds a scale into the op before a Linear, what llama.cpp calls it); this module says *how* those
facts are used, once for every family.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


class NormKind(str, enum.Enum):
    """How a block normalises its input (what AWQ folds a scale into, what the engine computes)."""

    RMS = "rms"                    # y = x / rms(x) * w
    RMS_PLUS_ONE = "rms_plus_one"  # Gemma: y = x / rms(x) * (1 + w)
    LAYER = "layer"                # y = (x - mean) / std * w + b


class Fold(str, enum.Enum):
    """How AWQ divides the output of the op before a group of Linears by per-channel scales s."""

    NORM = "norm"                  # w /= s (and b /= s): RMSNorm or LayerNorm
    NORM_PLUS_ONE = "norm_plus_one"  # Gemma's (1 + w): 1 + w' = (1 + w) / s, so w' = (1 + w) / s - 1
    LINEAR = "linear"              # rows (and bias) of the previous Linear /= s
    LINEAR_LAST_ROWS = "linear_last_rows"  # only the last len(s) rows: the `up` half of a fused gate_up_proj


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, the op producing it (`prev`, "" when nothing can absorb a scale)
    and how a scale is folded into it; `inspect` is the module whose output error the alpha search measures."""

    prev: str
    linears: tuple[str, ...]
    inspect: str             # "" is the whole block
    fold: Fold = Fold.NORM
    input_of: str = ""       # module whose input the linears read, when `inspect` does not receive it
    companions: tuple[str, ...] = ()  # float modules also reading that input (routers): columns scaled too


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: transformers stores the experts as 3-D parameters (`gate_up_proj` [E, 2I, H],
    `down_proj` [E, H, I]) in the module at `path` inside each block; lowbit replaces that module by one
    Linear per expert projection (`path.{e}.gate_proj` ...) so every expert is quantized like any other
    Linear and calibrated on exactly the tokens routed to it."""

    path: str = "mlp.experts"
    projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # How a checkpoint on disk may spell one block's experts, when not as lowbit's per-expert names: module
    # paths renamed ((on disk, in the model), e.g. Mixtral's ("block_sparse_moe.", "mlp.")) and the per-expert
    # projections' names on disk in `projections` order (Mixtral: w1, w3, w2). transformers' fused 3-D tensors
    # (`path.gate_up_proj`, `path.down_proj`) are understood for every family.
    disk_renames: tuple[tuple[str, str], ...] = ()
    disk_projections: tuple[str, ...] = ()
    # Routing, as transformers computes it (what the engine's decoder and compiled step compute): the router
    # Linear at `router` (inside the block) gives one logit per expert; probabilities are the softmax over all
    # experts, each token runs the config's `top_k` most probable ones, weighted by their probabilities,
    # divided by their sum when `renormalize` says ("always": Mixtral, whose weights are then the softmax of the
    # top-k logits; otherwise the config attribute that says, Qwen-MoE's norm_topk_prob).
    router: str = "mlp.gate"
    top_k: str = "num_experts_per_tok"
    renormalize: str = "always"
    # A shared expert every token runs (Qwen2-MoE), added to the routed experts' sum with the weight
    # sigmoid(shared_gate(x)); "" when the family has none.
    shared_expert: str = ""
    shared_gate: str = ""

    def renormalizes(self, config: Any) -> bool:
        """Whether the top-k probabilities are divided by their sum, for this config."""
        return self.renormalize == "always" or bool(getattr(config, self.renormalize))


@dataclass(frozen=True)
class BlockLayout:
    """Where a pre-norm block keeps its norms (paths inside a block), for the engine's decoder; its Linears are
    `Architecture.sequential`'s four stages (attention inputs, attention output, MLP inputs, MLP output)."""

    input_norm: str = "input_layernorm"            # before attention
    mlp_norm: str = "post_attention_layernorm"     # before the MLP
    attn_out_norm: str = ""                        # sandwich norms: of the attention / MLP output, before the
    mlp_out_norm: str = ""                         # residual add ("" when absent)
    q_norm: str = "self_attn.q_norm"               # per-head norms, read when `qk_norm`
    k_norm: str = "self_attn.k_norm"


# Gemma 2 / 3: post_attention_layernorm normalises the attention *output*; the MLP reads pre_feedforward_layernorm
SANDWICH_LAYOUT = BlockLayout(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                              mlp_out_norm="post_feedforward_layernorm")


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp names and lays out this family (`arch` is gguf.constants.MODEL_ARCH's member)."""

    arch: str                              # MODEL_ARCH member name, e.g. "GEMMA3"
    permute_qk: bool = False               # llama.cpp's interleaved-rope row order of q/k (llama only)
    norm_shift: float = 0.0                # added to every *norm.weight on export (Gemma stores 1 + w)
    qkv_layout: str = ""                   # "" | "heads_interleaved" (BLOOM, NeoX) | "kv_groups" (Falcon)
    always_tied: bool = False              # llama.cpp reads the output projection from token_embd
    keep_float: tuple[str, ...] = ("ffn_gate_inp",)  # tensors llama-quantize never quantizes (routers)
    hparams: Callable[[Any], dict[str, Any]] | None = None        # family-specific keys (export)
    config_from: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # and back (import)

    @property
    def name(self) -> str:
        """general.architecture as llama.cpp writes it (gguf.constants.MODEL_ARCH_NAMES)."""
        from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES

        return MODEL_ARCH_NAMES[MODEL_ARCH[self.arch]]


@dataclass(frozen=True)
class Architecture:
    """Everything lowbit's methods, formats, loaders and engine need to know about one family."""

    family: str
    model_types: tuple[str, ...]           # config.json model_type values
    hf_classes: tuple[str, ...]            # transformers *ForCausalLM classes
    blocks_path: str
    embed_path: str
    final_norm_path: str
    lm_head_path: str
    sequential: tuple[tuple[str, ...], ...]  # true-sequential order of the Linears inside a block
    scale_groups: tuple[ScaleGroup, ...]
    # facts the engine's fast path needs
    norm: NormKind = NormKind.RMS
    activation: str = "silu"               # silu | gelu_tanh | gelu | relu
    activation_config: str = "hidden_act"  # the config attribute the family's MLP reads its activation from
    activation_class: str = ""             # the MLP's activation module when not one of transformers' ACT2FN
                                           # (BLOOM's BloomGelu): it computes `activation`
    gated_mlp: bool = True                 # act(gate) * up
    position: str = "rope"                 # rope | partial_rope | alibi | learned
    position_embed_path: str = ""          # learned: the position embedding added to the token's (GPT-2's wpe)
    position_offset: int = 0               # its row of position p is p + offset (OPT: 2)
    embed_norm_path: str = ""              # a norm applied to the embeddings (BLOOM's word_embeddings_layernorm)
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    logit_softcap: bool = False            # Gemma 2: tanh soft-capping of attention and final logits
    sliding_window: bool = False           # some or all layers attend within a window
    # the config attribute listing each decoder layer's type ("sliding_attention", "full_attention"), by which
    # transformers gives a layer its attention mask and, in Gemma 3, its rotary table: calibration records one
    # block call per type (lowbit.calibration.capture.RecordedCalls); "" when every layer is called alike
    layer_types: str = ""
    sandwich_norm: bool = False            # Gemma 2/3: extra norms after attention and after the MLP
    parallel_attn_mlp: bool = False        # x + attn(ln(x)) + mlp(ln(x)) (Falcon, NeoX, GPT-J style)
    parallel_switch: str = ""              # config attribute that can turn parallel_attn_mlp off (NeoX's)
    embed_scale: bool = False              # Gemma multiplies embeddings by sqrt(hidden)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused Linear -> the projections it holds
    tied_head: str = "config"              # "config": tie_word_embeddings says; "always": head is the embedding
    layout: BlockLayout = BlockLayout()    # norm paths inside a block (engine decoder)
    # the engine decoder's four stages (attention inputs, attention output, MLP inputs, MLP output) when
    # `sequential` groups the Linears otherwise (Falcon quantizes q|k|v and h_to_4h together: one norm feeds both)
    engine_stages: tuple[tuple[str, ...], ...] = ()
    kv_heads_of: Callable[[Any], int] | None = None   # KV heads from the config, when not num_key_value_heads
    engine_refuses: Callable[[Any], str | None] | None = None   # configs of the family the decoder cannot run

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        return self.engine_stages or self.sequential
    no_clip: tuple[str, ...] = ()          # Linears whose outputs meet in a softmax: AWQ does not clip them
    keep_float: tuple[str, ...] = ()       # Linears never quantized (tiny gates); skip patterns
    experts: Experts | None = None
    gguf: GGUFSpec | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Bring a freshly built transformers model into the layout lowbit quantizes (experts unfused)."""
        if self.experts is not None:
            unfuse_experts(model, self)
        return model



# -- facts the engine's decoder reads from a config ------------------------------------------------------------
# transformers' activation names -> what lowbit's decoder computes on the gate
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
# rope variants whose tables depend on the length of the sequence seen so far (not one table for all positions)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rotary_path(arch: Architecture) -> str:
    """transformers keeps the rotary module next to the embedding (model.rotary_emb)."""
    return f"{arch.embed_path.rpartition('.')[0]}.rotary_emb".lstrip(".")


def rope_parameters_by_type(config: Any) -> dict[str | None, dict]:
    """The config's rope parameters by layer type when it nests them by type (Gemma 3: sliding and full
    attention), else {None: the one dict}; {} without any."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict) or not rope:
        return {}
    nested = {name: value for name, value in rope.items() if isinstance(value, dict)}
    return nested or {None: rope}


def rope_parameter_sets(config: Any) -> list[dict]:
    """The config's rope parameters: one dict, or one per layer type when they are nested by type (Gemma 3)."""
    return list(rope_parameters_by_type(config).values())


# -- Linear-like modules -----------------------------------------------------------------------------------
def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), whose weight is stored transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module):
    """The [out, in] weight of a Linear-like module (Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = linear_weight(module)
    return w.shape[1], w.shape[0]


# -- mixture of experts ------------------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), as ordinary Linears."""

    def __init__(self, hidden: int, intermediate: int, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused *Experts module (same call: hidden [T, H], top-k ids and weights):
    routes each token to its experts, which are separate ExpertMLP modules; an expert runs on exactly the
    tokens routed to it, so calibration hooks on its Linears see those tokens and no others."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, arch: Architecture) -> None:
    """Replace every fused experts module of `model` by UnfusedExperts holding the same weights."""
    for block in arch.blocks(model):
        try:
            fused = block.get_submodule(arch.experts.path)
        except AttributeError:
            continue  # a dense layer of a model that mixes dense and MoE layers
        if isinstance(fused, UnfusedExperts):
            continue
        gate_up, down = fused.gate_up_proj, fused.down_proj   # [E, 2I, H], [E, H, I]
        n_experts, two_i, hidden = gate_up.shape
        inter = two_i // 2
        experts = UnfusedExperts()
        for e in range(n_experts):
            expert = ExpertMLP(hidden, inter, fused.act_fn)
            if not gate_up.is_meta:
                with torch.no_grad():
                    expert.gate_proj.weight.copy_(gate_up[e, :inter])
                    expert.up_proj.weight.copy_(gate_up[e, inter:])
                    expert.down_proj.weight.copy_(down[e])
            expert.to(dtype=gate_up.dtype)
            experts.append(expert)
        parent_name, _, child = arch.experts.path.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, experts)


# -- GGUF tensor names and layouts ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tensor_name_map(gguf_arch: str, n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch], n_blocks)


def gguf_tensor_name(arch: Architecture, hf_name: str, n_blocks: int) -> tuple[str, int | None]:
    """(GGUF name, expert index or None) of an HF parameter, from gguf-py's TensorNameMap.

    Expert Linears (`...experts.3.gate_proj.weight`) map to the stacked tensor llama.cpp expects
    (`blk.N.ffn_gate_exps.weight`) and return their index in the stack."""
    from lowbit.errors import UnsupportedArchitecture

    if arch.gguf is None:
        raise UnsupportedArchitecture(f"llama.cpp has no {arch.family} architecture: GGUF export is not possible")
    expert = None
    name = hf_name
    if arch.experts is not None:
        marker = f".{arch.experts.path}."
        head, sep, tail = hf_name.partition(marker)
        if sep:
            index, _, rest = tail.partition(".")
            expert, name = int(index), f"{head}{marker}{rest}"
    table = _tensor_name_map(arch.gguf.arch, n_blocks)
    mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None and "." in name:  # convert_hf_to_gguf strips "transformer." for BLOOM before mapping
        mapped = table.get_name(name.split(".", 1)[1], try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedArchitecture(f"tensor {hf_name!r} has no llama.cpp name for architecture "
                                      f"{arch.gguf.name!r} in gguf-py's tensor map")
    return mapped, expert


def qkv_row_order(layout: str, n_head: int, n_head_kv: int, head_dim: int) -> torch.Tensor | None:
    """Row permutation taking a fused HF query_key_value weight to llama.cpp's q|k|v order (None: same).

    heads_interleaved (BLOOM, GPT-NeoX): HF rows are [head][q,k,v][head_dim].
    kv_groups (Falcon): HF rows are [kv group][n_head/n_head_kv queries, key, value][head_dim]."""
    if not layout:
        return None
    if layout == "heads_interleaved":
        rows = torch.arange(3 * n_head * head_dim).reshape(n_head, 3, head_dim)
        return rows.transpose(0, 1).reshape(-1)
    if layout == "kv_groups":
        per = n_head // n_head_kv
        rows = torch.arange((n_head + 2 * n_head_kv) * head_dim).reshape(n_head_kv, per + 2, head_dim)
        q, k, v = rows[:, :per].reshape(-1), rows[:, per].reshape(-1), rows[:, per + 1].reshape(-1)
        return torch.cat([q, k, v])
    raise ValueError(f"unknown qkv layout {layout!r}")


# -- templates over experts ------------------------------------------------------------------------------------
EXPERT = "{e}"


def expand_experts(names: tuple[str, ...], block: nn.Module, arch: Architecture) -> tuple[str, ...]:
    """Names with `{e}` repeated for every expert of this block (none in a dense block)."""
    if arch.experts is None or not any(EXPERT in n for n in names):
        return tuple(n for n in names if EXPERT not in n)
    try:
        n_experts = len(block.get_submodule(arch.experts.path))
    except AttributeError:
        n_experts = 0
    out: list[str] = []
    for name in names:
        out += [name.format(e=e) for e in range(n_experts)] if EXPERT in name else [name]
    return tuple(out)


def is_expert_linear(arch: Architecture, name: str) -> bool:
    return arch.experts is not None and f"{arch.experts.path}." in f"{name}"


# -- GGUF hyper-parameters shared by the llama-like families -------------------------------------------------
def config_value(config, *names, default=None):
    """A config attribute, also looked up in transformers 5's rope_parameters dict."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    rope = getattr(config, "rope_parameters", None) or {}
    for name in names:
        if isinstance(rope, dict) and rope.get(name) is not None:
            return rope[name]
    return default


def head_dim_of(config) -> int:
    n_head = config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // n_head


def llama_like_hparams(config) -> dict[str, Any]:
    """{suffix: value} of the keys every rope + RMSNorm family writes (prefixed with the arch by the writer)."""
    n_head = config.num_attention_heads
    head_dim = head_dim_of(config)
    out = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "attention.head_count": int(n_head),
        "attention.head_count_kv": int(getattr(config, "num_key_value_heads", None) or n_head),
        "rope.freq_base": float(config_value(config, "rope_theta", default=10000.0)),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "rope.dimension_count": int(head_dim * float(config_value(config, "partial_rotary_factor", default=1.0))),
        "vocab_size": int(config.vocab_size),
    }
    if head_dim * n_head != config.hidden_size:
        out["attention.key_length"] = int(head_dim)
        out["attention.value_length"] = int(head_dim)
    return out


def llama_like_config(meta: dict[str, Any]) -> dict[str, Any]:
    """transformers config kwargs from the keys llama_like_hparams writes (`meta` without the arch prefix)."""
    n_head = int(meta["attention.head_count"])
    out = dict(
        hidden_size=int(meta["embedding_length"]), intermediate_size=int(meta["feed_forward_length"]),
        num_hidden_layers=int(meta["block_count"]), num_attention_heads=n_head,
        num_key_value_heads=int(meta.get("attention.head_count_kv", n_head)),
        rms_norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get("context_length", 2048)),
    )
    out["head_dim"] = int(meta.get("attention.key_length", out["hidden_size"] // n_head))
    return out


def moe_hparams(config) -> dict[str, Any]:
    return {"expert_count": int(config_value(config, "num_local_experts", "num_experts")),
            "expert_used_count": int(config.num_experts_per_tok)}


def moe_config(meta: dict[str, Any], experts_key: str) -> dict[str, Any]:
    return {experts_key: int(meta["expert_count"]), "num_experts_per_tok": int(meta["expert_used_count"])}


# -- HF <-> llama.cpp tensor layouts ---------------------------------------------------------------------------
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order of a q/k projection (interleaved rope halves), as convert_hf_to_gguf does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp -> HF row order of a q/k projection (inverse of permute_qk)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_row_order(arch: Architecture, config, hf_name: str, rows: int) -> torch.Tensor | None:
    """Indices such that gguf_rows = hf_rows[order] (None when llama.cpp keeps HF's row order). A pure row
    permutation, so it applies to quantized blocks as well as to float rows."""
    spec = arch.gguf
    if spec is None:
        return None
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    if spec.permute_qk and hf_name.endswith((".q_proj.weight", ".k_proj.weight")):
        heads = n_head if ".q_proj." in hf_name else n_head_kv
        return permute_qk(torch.arange(rows), heads)
    if spec.qkv_layout and any(hf_name.startswith(f"{arch.blocks_path}.") and f".{m}." in hf_name
                               for m in arch.fused if arch.fused[m] == ("q", "k", "v")):
        head_dim = config.hidden_size // n_head
        n_kv = rows // head_dim - n_head
        n_kv = n_kv // 2 if spec.qkv_layout == "kv_groups" else n_head
        return qkv_row_order(spec.qkv_layout, n_head, n_kv, head_dim)
    return None


def norm_shift(arch: Architecture, hf_name: str) -> float:
    """What llama.cpp adds to this tensor (Gemma's norms store 1 + w)."""
    if arch.gguf is not None and arch.gguf.norm_shift and hf_name.endswith("norm.weight"):
        return arch.gguf.norm_shift
    return 0.0
