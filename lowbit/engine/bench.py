"""Prompt-processing and generation speed, measured like llama-bench (pp512, tg128), for lowbit's engine and
for the peers it is compared with (transformers' own forward/generate, llama.cpp via llama-cpp-python)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.errors import LowbitError


@dataclass
class SpeedResult:
    """Tokens per second of one runner: prompt processing (pp) and generation (tg), median over repetitions."""

    runner: str
    threads: int
    pp_tokens: int
    tg_tokens: int
    pp_tok_s: float | None
    tg_tok_s: float | None
    pp_runs: list[float]
    tg_runs: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_tokens(vocab_size: int, count: int, seed: int = 0) -> list[int]:
    """Reproducible random token ids (llama-bench also measures on random tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (count,), generator=generator).tolist()


def _median_rate(tokens: int, seconds: list[float]) -> tuple[float | None, list[float]]:
    rates = [tokens / s for s in seconds if s > 0]
    return (statistics.median(rates) if rates else None), [round(r, 2) for r in rates]


def _timed(fn: Callable[[], Any], reps: int) -> list[float]:
    fn()   # warm-up: kernels prepare their packed state, allocator settles
    runs = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - began)
    return runs


def bench_engine(engine: Engine, pp: int = 512, tg: int = 128, reps: int = 3, name: str = "lowbit") -> SpeedResult:
    """pp: one prefill of `pp` random tokens; tg: `tg` greedy decode steps after a 1-token prompt."""
    vocab = engine.model.config.vocab_size
    if pp + 1 > engine.context or tg + 2 > engine.context:
        raise LowbitError(f"the engine's context {engine.context} is too small for pp{pp} / tg{tg}")
    prompt = bench_tokens(vocab, max(pp, 1))   # tg alone still needs its 1-token prompt
    greedy = SamplingParams(max_new_tokens=tg, temperature=0.0)

    def prefill() -> None:
        engine.release(engine.start(prompt, SamplingParams(max_new_tokens=1, temperature=0.0)))

    def generate() -> None:
        seq = engine.start(prompt[:1], greedy, stop_on_eos=False)
        while not seq.finished:
            engine.step()
        engine.release(seq)

    pp_runs = _timed(prefill, reps) if pp else []
    # tg timing includes one 1-token prefill, as llama-bench's tg includes its first token.
    tg_runs = _timed(generate, reps) if tg else []
    pp_rate, pp_rates = _median_rate(pp, pp_runs)
    tg_rate, tg_rates = _median_rate(tg, tg_runs)
    return SpeedResult(name, engine.threads, pp, tg, pp_rate, tg_rate, pp_rates, tg_rates)


@torch.inference_mode()
def bench_transformers(model: nn.Module, pp: int = 512, tg: int = 128, reps: int = 3,
                       name: str = "transformers") -> SpeedResult:
    """The same measurements through transformers: one forward over `pp` tokens, `generate` for `tg` tokens."""
    vocab = model.config.vocab_size
    prompt = torch.tensor([bench_tokens(vocab, pp)])

    def prefill() -> None:
        model(prompt, use_cache=False, logits_to_keep=1)

    def generate() -> None:
        model.generate(prompt[:, :1], max_new_tokens=tg, min_new_tokens=tg, do_sample=False,
                       pad_token_id=0)

    pp_runs = _timed(prefill, reps) if pp else []
    tg_runs = _timed(generate, reps) if tg else []
    pp_rate, pp_rates = _median_rate(pp, pp_runs)
    tg_rate, tg_rates = _median_rate(tg, tg_runs)
    return SpeedResult(name, torch.get_num_threads(), pp, tg, pp_rate, tg_rate, pp_rates, tg_rates)


def memory_read_bandwidth(threads: int | None = None, size_mb: int = 1024, reps: int = 5) -> float:
    """GB/s of summing a float32 tensor much larger than the caches (a read-only stream), on `threads` threads."""
    if threads:
        torch.set_num_threads(threads)
    data = torch.ones(size_mb * 1024 * 1024 // 4)
    data.sum()
    best = float("inf")
    for _ in range(reps):
        began = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - began)
    return data.numel() * 4 / best / 1e9


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (it is an optional peer, never needed by lowbit itself)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def bench_llama_cpp(gguf_path: str, threads: int, pp: int = 512, tg: int = 128, reps: int = 3,
                    name: str = "llama.cpp") -> SpeedResult:
    """pp/tg of llama.cpp (llama-cpp-python) on a .gguf with the same threads and random tokens."""
    if not llama_cpp_available():
        raise LowbitError("--vs-llama-cpp needs llama-cpp-python: pip install llama-cpp-python "
                          "(see DEVELOPERS.md for the CPU build flags)")
    import llama_cpp

    # scores holds n_batch rows (logits_all is off): room for every token tg evaluates one at a time
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(pp, tg) + 16, n_batch=max(pp, tg, 1),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = bench_tokens(llm.n_vocab(), max(pp, 1))

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def generate() -> None:
        # llama-bench's tg feeds one token per step; greedy sampling from the logits is what lowbit does too.
        llm.reset()
        token = prompt[0]
        for _ in range(tg):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())

    pp_runs = _timed(prefill, reps) if pp else []
    tg_runs = _timed(generate, reps) if tg else []
    pp_rate, pp_rates = _median_rate(pp, pp_runs)
    tg_rate, tg_rates = _median_rate(tg, tg_runs)
    if hasattr(llm, "close"):
        llm.close()
    return SpeedResult(name, threads, pp, tg, pp_rate, tg_rate, pp_rates, tg_rates)


def format_speed_table(results: list[SpeedResult]) -> str:
    """A llama-bench-like table: runner, threads, pp tok/s, tg tok/s."""
    lines = [f"| {'runner':<34} | threads | {'test':>6} | {'tok/s':>9} |", f"|{'-' * 36}|---------|--------|-----------|"]
    for r in results:
        for test, rate in ((f"pp{r.pp_tokens}", r.pp_tok_s), (f"tg{r.tg_tokens}", r.tg_tok_s)):
            if rate is not None:
                lines.append(f"| {r.runner:<34} | {r.threads:>7} | {test:>6} | {rate:>9.1f} |")
    return "\n".join(lines)
