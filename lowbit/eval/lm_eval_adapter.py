"""lm-evaluation-harness model `lowbit`: any model lowbit loads (folders, GGUF, lowbit/GPTQ/AWQ/compressed-tensors
files, packaged names), optionally quantized on load, evaluated by the harness's tasks.

lm-eval finds models only in its own registry (no plugin entry points), so the `lowbit` name is registered when
this module is imported; `lowbit-lm-eval` (or `python -m lowbit.eval.lm_eval_adapter`) does that and then runs
lm-eval's own command line:

    lowbit-lm-eval --model lowbit --model_args pretrained=PATH[,quantize=nf4,compute=float32] --tasks TASK

Scoring is lowbit's (lowbit.eval.tasks.continuation_scores): context and continuation tokenized apart, log-probs in
float32 arithmetic by default (`compute=runtime` for the runtime's fast kernels).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:            # lm-eval absent: the module still imports, and using the adapter says how to get it
    LM = object

    def register_model(*_names):
        return lambda cls: cls

INSTALL_HINT = "pip install lm-eval==0.4.13"


@register_model("lowbit")
class LowbitLM(LM):
    """lm-eval's LM interface over a lowbit model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pretrained: str, quantize: str | None = None, compute: str = "float32",
                 max_length: int = 2048, batch_size: Any = 1, **unknown: Any) -> None:
        if LM is object:
            raise LowbitError(f"the lm-eval adapter needs lm-evaluation-harness: {INSTALL_HINT}")
        if unknown:
            raise LowbitError(f"lowbit's lm-eval model has no argument {', '.join(map(repr, sorted(unknown)))}; it "
                              "accepts pretrained, quantize, compute, max_length, batch_size")
        if compute not in ("float32", "runtime"):
            raise LowbitError(f"compute {compute!r} unknown; use float32 or runtime")
        super().__init__()
        import lowbit

        self.model = lowbit.load(pretrained, quantize=quantize, keep_quantized=True)
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise LowbitError(f"{pretrained} has no tokenizer; lm-eval tasks need one")
        self.compute = compute
        self.max_length = int(max_length)
        if compute == "float32":     # generate_until decodes through the engine: float32 activations there too
            self.model.lowbit_engine_options = {"activations": "float32"}

    def _arithmetic(self):
        from lowbit.runtime.cpu import float32_arithmetic

        return float32_arithmetic() if self.compute == "float32" else contextlib.nullcontext()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from lowbit.eval.tasks import continuation_scores

        results = []
        with self._arithmetic():
            for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
                context, continuation = request.args[:2]
                results.append(continuation_scores(self.model, self.tokenizer, context, [continuation])[0])
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each text, in windows of max_length tokens (each after the previous
        window's last token; the first token after BOS/EOS)."""
        from lowbit.eval.tasks import _prefix_token

        results = []
        with self._arithmetic():
            for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
                ids = self.tokenizer(request.args[0], add_special_tokens=False).input_ids
                tokens = [_prefix_token(self.tokenizer)] + ids
                total, start = 0.0, 0
                while start < len(ids):
                    window = torch.tensor(tokens[start:start + self.max_length + 1])
                    logp = torch.log_softmax(self.model(window[None, :-1], use_cache=False).logits[0].float(), -1)
                    total += logp.gather(1, window[1:, None]).sum().item()
                    start += self.max_length
                results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lowbit.engine.generate import SamplingParams, generate_text

        outputs = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            params = SamplingParams(max_new_tokens=int(kwargs.pop("max_gen_toks", 256)),
                                    temperature=float(kwargs.pop("temperature", 0.0) or 0.0)).validate()
            text, _ = generate_text(self.model, self.tokenizer, context, params)
            cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
            outputs.append(text[:cut])
        return outputs


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `lowbit` model registered."""
    if LM is object:
        print(f"lowbit-lm-eval: lm-evaluation-harness is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except LowbitError as exc:
        print(f"lowbit-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
