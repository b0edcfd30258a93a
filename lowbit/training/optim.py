"""8-bit AdamW: Adam's two moment estimates stored as 8-bit codes with an absmax per block (bitsandbytes'
blockwise dynamic quantization, Dettmers et al. 2022), 4x less optimizer memory than float32 states.

bitsandbytes' own AdamW8bit is used when its CPU build runs it; otherwise `AdamW8bit` below does the same
arithmetic: per step the states are decoded, updated in float32, and re-encoded on bitsandbytes' dynamic maps
(signed for the first moment, unsigned for the second) in blocks of 256, with the nearest code chosen exactly
(searching the sorted map). Tensors under 4096 values keep float32 states, as bitsandbytes does.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch

log = logging.getLogger("lowbit")

BLOCK = 256
MIN_8BIT_SIZE = 4096


@lru_cache(maxsize=2)
def _state_map(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted map values, midpoints between them) of bitsandbytes' dynamic map."""
    from lowbit.schemes.codebook import dynamic_map

    values = dynamic_map(signed=signed)
    return values, (values[:-1] + values[1:]) / 2


def encode_state(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (nearest map value of x / absmax of its block of 256) and float32 absmax per block."""
    values, midpoints = _state_map(signed)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-30)
    codes = torch.bucketize((blocks / absmax[:, None]).clamp(-1, 1), midpoints).to(torch.uint8)
    return codes.reshape(-1)[: flat.numel()], absmax


def decode_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, shape: torch.Size) -> torch.Tensor:
    values, _ = _state_map(signed)
    decoded = values[codes.long()]
    return (decoded * absmax.repeat_interleave(BLOCK)[: decoded.numel()]).reshape(shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 8-bit blockwise moment states."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                quantized = p.numel() >= MIN_8BIT_SIZE
                if not state:
                    state["step"] = 0
                    if quantized:
                        state["m_codes"], state["m_absmax"] = encode_state(torch.zeros_like(grad), True)
                        state["v_codes"], state["v_absmax"] = encode_state(torch.zeros_like(grad), False)
                    else:
                        state["m"], state["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                if quantized:
                    m = decode_state(state["m_codes"], state["m_absmax"], True, grad.shape)
                    v = decode_state(state["v_codes"], state["v_absmax"], False, grad.shape)
                else:
                    m, v = state["m"], state["v"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                t = state["step"]
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
                if quantized:
                    state["m_codes"], state["m_absmax"] = encode_state(m, True)
                    state["v_codes"], state["v_absmax"] = encode_state(v, False)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold (what 8-bit states save)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def adamw_8bit(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit when it runs on this CPU, else lowbit's AdamW8bit (same state format)."""
    params = list(params)
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        probe = torch.zeros(MIN_8BIT_SIZE, requires_grad=True)
        check = bnb.optim.AdamW8bit([probe], lr=lr)
        probe.grad = torch.ones_like(probe)
        check.step()
        log.info("8-bit AdamW: bitsandbytes %s", bnb.__version__)
        return optimizer
    except Exception as exc:  # noqa: BLE001  (any failure of the optional peer: use lowbit's)
        log.info("8-bit AdamW: lowbit's (bitsandbytes' CPU optimizer unavailable: %s)",
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
