"""An OpenAI-compatible HTTP server over lowbit's engine, with continuous batching.

Threads: a bounded pool of HTTP workers (engine/http_transport.py: at most `http_workers` connections served at
once, a bounded number waiting, the rest refused with 503) reads, validates and tokenizes each request and queues
it; ONE scheduler thread owns the engine: it admits queued requests into free cache slots (prefill), then decodes
one token for every running sequence in a single batched step, and hands each new token to its request's worker,
which detokenizes it and writes it to the client. Tokenizing and detokenizing never run on the scheduler's
thread, and each worker borrows its own copy of the tokenizer, so a long prompt delays only its own request.
A client that disconnects marks its request cancelled; the scheduler frees its slot at the next step.
At most `max_queue` requests wait for a slot; beyond that the server answers 429.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import torch

from lowbit.engine.generate import SamplingParams, stop_ids
from lowbit.engine.http_transport import BoundedHTTPServer, ServerLimits, error_payload
from lowbit.engine.runner import Engine, Sequence
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20            # chat's top_logprobs (OpenAI's limit); completions' logprobs allows 5
MAX_COMPLETION_LOGPROBS = 5
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)   # what torch.Generator.manual_seed takes
POLL_SECONDS = 0.05
TOKENIZER_COPIES = 4
# Text is tokenized in growing prefixes starting at context x this many characters, so a prompt far longer than
# the context is refused after tokenizing a prefix, never the whole (850 kB took 1.1 s and hundreds of MB).
PROMPT_CHARS_PER_TOKEN = 8
ROUTES = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}
PUBLIC_ROUTES = ("/health",)   # answered without the API key (load balancers' health checks)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Request fields by endpoint. Unknown fields are a 400 (OpenAI's answer too), never silently ignored.
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "n", "user", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                               "tool_choice", "parallel_tool_calls", "metadata", "store", "service_tier"}


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and an OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


@dataclass
class GenerationRequest:
    """A validated request travelling from its worker thread to the scheduler and back."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: tuple[str, ...] = ()
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_on_eos: bool = True
    sequence: Sequence | None = None
    queued_at: float = field(default_factory=time.monotonic)
    logprobs: bool = False         # return each generated token's log-probability
    top_logprobs: int = 0          # ... and the most likely alternatives at each position
    echo: str | None = None        # completions' echo: the prompt text, returned before the completion
    include_usage: bool = False    # stream_options.include_usage: a last chunk with the token counts


# -- the engine's side ------------------------------------------------------------------------------------------

class LogitsTap:
    """Keeps, per cache slot, the logits row its latest token was sampled from, for requests asking for logprobs.

    The Engine API returns sampled token ids only; the logits exist for a moment inside `Engine.start_many`
    (prefill) and `Engine.step` (decode), which get them from the decoder's `forward`, `prefill_prompts` and
    `decode`. Wrapping those on
    the decoder instance records each slot's row without changing the engine; every call returns a fresh tensor,
    so keeping a reference to a row costs no copy."""

    def __init__(self, engine: Engine):
        self.rows: dict[int, torch.Tensor] = {}
        decoder = engine.decoder
        forward = decoder.forward
        decode = getattr(decoder, "decode", None)
        prefill_prompts = getattr(decoder, "prefill_prompts", None)

        def tapped_forward(tokens, rows, positions, all_logits=False):
            logits = forward(tokens, rows, positions, all_logits)
            if not all_logits:
                for row, slot in enumerate(range(rows.start or 0, rows.stop)):
                    self.rows[slot] = logits[row]
            return logits

        def tapped_decode(tokens, slots, positions):
            logits = decode(tokens, slots, positions)
            for row, slot in enumerate(slots.tolist()):
                self.rows[slot] = logits[row]
            return logits

        def tapped_prefill_prompts(prompts, slots):
            logits = prefill_prompts(prompts, slots)
            for row, slot in enumerate(slots):
                self.rows[slot] = logits[row]
            return logits

        decoder.forward = tapped_forward
        if decode is not None:
            decoder.decode = tapped_decode
        if prefill_prompts is not None:
            decoder.prefill_prompts = tapped_prefill_prompts


class Scheduler:
    """Owns the engine: admits queued requests into free slots and steps all running sequences together."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.pending: collections.deque[GenerationRequest] = collections.deque()
        self.running: dict[int, GenerationRequest] = {}
        self.wakeup = threading.Condition()
        self.stopping = False
        self.completed = 0
        self.logits = LogitsTap(engine)
        self.thread = threading.Thread(target=self._loop, name="lowbit-scheduler", daemon=True)

    def start(self) -> None:
        """Run the scheduler in its own thread (for a server embedded in another program)."""
        self.thread.start()

    def run(self) -> None:
        """Run the scheduler in the calling thread until `stop()`.

        `lowbit serve` runs it in the main thread, which loaded the model and so already owns OpenMP's thread
        pool. Stepping from a second thread makes libgomp keep a second pool, and with more pool threads than
        CPUs it stops spinning at barriers and sleeps instead: measured 80 against 220 tok/s on 2 cores.
        """
        self._loop()

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def wakeup_now(self) -> None:
        """Let the scheduler notice a cancellation even when it is idle."""
        with self.wakeup:
            self.wakeup.notify()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise RequestError(429) when the queue is full."""
        with self.wakeup:
            if len(self.pending) >= self.max_queue:
                raise RequestError(429, f"the server is busy: {len(self.pending)} requests already wait for a "
                                        f"slot (limit {self.max_queue}); retry later", "rate_limit_exceeded",
                                   headers={"Retry-After": "1"})
            self.pending.append(request)
            self.wakeup.notify()

    def _token_event(self, request: GenerationRequest, seq: Sequence) -> None:
        # The logits row goes with the token only when asked for: the worker computes the log-softmax.
        row = self.logits.rows.get(seq.slot) if request.logprobs else None
        request.events.put(("token", (seq.generated[-1], row)))

    def _admit(self) -> None:
        """Start every waiting request that a free slot can take, their prompts prefilled together (a burst of
        requests shares the prompt GEMMs' weight dequantization): a bad request gets its 400 alone; a prefill
        that fails fails the requests prefilled with it."""
        admitted: list[tuple[GenerationRequest, Sequence]] = []
        while len(admitted) < len(self.engine.free_slots):
            with self.wakeup:
                if not self.pending:
                    break
                request = self.pending.popleft()
            if request.cancelled.is_set():
                request.events.put(("done", "cancelled"))
                continue
            try:
                admitted.append((request, self.engine.new_sequence(request.prompt_ids, request.params,
                                                                   request.stop_on_eos)))
            except LowbitError as exc:
                request.events.put(("error", RequestError(400, str(exc))))
            except Exception as exc:   # a bug, not the request: fail it alone (the others popped stay admitted)
                log.exception("request check failed")
                request.events.put(("error", RequestError(500, f"request failed: {exc}", "server_error")))
        if not admitted:
            return
        try:
            self.engine.start_many([seq for _, seq in admitted])
        except LowbitError as exc:
            for request, _ in admitted:
                request.events.put(("error", RequestError(400, str(exc))))
            return
        except Exception as exc:  # e.g. out of memory in the prefill: fail these requests, keep serving
            log.exception("prefill failed")
            for request, _ in admitted:
                request.events.put(("error", RequestError(500, f"prefill failed: {exc}", "server_error")))
            return
        for request, seq in admitted:    # all running before any event: a failing event fails (releases) them all
            request.sequence = seq
            self.running[seq.slot] = request
        for request, seq in admitted:
            self._token_event(request, seq)

    def _retire(self) -> None:
        for slot, request in list(self.running.items()):
            seq = request.sequence
            if request.cancelled.is_set() and not seq.finished:
                seq.finish_reason = "cancelled"
            if seq.finished:
                self.engine.release(seq)
                del self.running[slot]
                self.logits.rows.pop(slot, None)
                self.completed += 1
                request.events.put(("done", seq.finish_reason))

    def _fail_running(self, exc: BaseException) -> None:
        log.exception("generation step failed; failing the running requests and carrying on")
        for request in self.running.values():
            self.engine.release(request.sequence, "error")
            request.events.put(("error", RequestError(500, f"generation failed: {exc}", "server_error")))
        self.running.clear()

    def _loop(self) -> None:
        try:
            while True:
                with self.wakeup:
                    while not self.stopping and not self.pending and not self.running:
                        self.wakeup.wait()
                    if self.stopping:
                        break
                try:
                    self._admit()
                    self._retire()
                    stepped = self.engine.step()
                    for seq in stepped:
                        self._token_event(self.running[seq.slot], seq)
                    self._retire()
                except Exception as exc:  # keep serving: one failed step must not take the server down
                    self._fail_running(exc)
        finally:   # stopped, or Ctrl-C in `lowbit serve`: tell every waiting request
            for request in list(self.running.values()) + list(self.pending):
                request.events.put(("error", RequestError(503, "the server is shutting down", "server_error")))


# -- request parsing -------------------------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any, check=None, rule: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(400, f"'{name}' must be {rule or ' or '.join(k.__name__ for k in kinds)}", param=name)
    if check is not None and not check(value):
        raise RequestError(400, f"'{name}' is out of range: it must be {rule} (got {value!r})", param=name)
    return value


def check_json_shape(body: Any, max_depth: int) -> None:
    """RequestError(400) for JSON nested deeper than `max_depth` or holding a string that is not valid Unicode (a
    lone surrogate such as "\\ud800" parses, then breaks the tokenizer and every encoder)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise RequestError(400, f"the request holds a string with a lone surrogate "
                                            f"({value[exc.start]!a}); send valid Unicode") from None
            continue
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise RequestError(400, f"the request's JSON is nested deeper than {max_depth} levels")
            items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items if isinstance(item, str | dict | list))


class TokenizerPool:
    """Copies of one tokenizer, borrowed one per call: HF fast tokenizers must not be shared across threads, and
    with one lock a long prompt's tokenization made every other request's detokenization wait (up to 11 s)."""

    def __init__(self, tokenizer: Any, copies: int = TOKENIZER_COPIES):
        self.original = tokenizer
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free.put(tokenizer)
        for _ in range(copies - 1):
            self._free.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        tokenizer = self._free.get()
        try:
            yield tokenizer
        finally:
            self._free.put(tokenizer)


class IncrementalDetokenizer:
    """Text of a growing list of token ids, decoding only a short window per token (vLLM's method): the text of
    ids[prefix:] minus that of ids[prefix:read] is the new text, and the window moves on once it is complete."""

    def __init__(self, tokenizers: TokenizerPool):
        self.tokenizers = tokenizers
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int, final: bool = False) -> str:
        """The text `token` completes ("" while it ends inside a multi-byte character, unless `final`)."""
        if token >= 0:
            self.ids.append(token)
        with self.tokenizers.borrow() as tokenizer:
            before = tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            after = tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        return self.add(-1, final=True)


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position."""

    text: str
    logprob: float
    top: list[tuple[str, float]]

    def chat(self) -> dict:
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {**entry(self.text, self.logprob), "top_logprobs": [entry(t, lp) for t, lp in self.top]}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """Completions' logprobs object for `entries`, their text starting at character `offset` of the choice."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**dict(e.top), e.text: e.logprob} for e in entries], "text_offset": offsets}


@dataclass
class Piece:
    """New text for the client, the finish reason once finished, and the logprobs of the tokens it covers."""

    text: str
    finish: str | None
    logprobs: list[TokenLogprob]


class Service:
    """What the HTTP handlers share: the model name, tokenizers, engine limits, the scheduler and the limits."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_queue: int,
                 limits: ServerLimits | None = None, api_key: str | None = None):
        if tokenizer is None:
            raise LowbitError("serving needs a tokenizer; this model has none")
        if api_key is not None and not api_key.strip():
            raise LowbitError("--api-key is empty; give a key or leave the option (and LOWBIT_API_KEY) unset")
        self.engine = engine
        self.tokenizer = tokenizer
        self.tokenizers = TokenizerPool(tokenizer)
        self.model_name = model_name
        self.created = int(time.time())
        self.scheduler = Scheduler(engine, max_queue)
        self.stop_token_ids = stop_ids(tokenizer)
        self.limits = (limits or ServerLimits()).validate()
        self.api_key = api_key.encode() if api_key else None
        self._token_texts: dict[int, str] = {}

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the API key (always, when the server has none)."""
        if self.api_key is None:
            return True
        scheme, _, key = (header or "").partition(" ")
        # compare_digest takes as long for any wrong key: the time does not tell an attacker how much matched
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key)

    def parse(self, body: Any, chat: bool) -> tuple[GenerationRequest, bool]:
        """A GenerationRequest and the stream flag from an OpenAI request body, or RequestError(400)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        check_json_shape(body, self.limits.max_json_depth)
        unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
        if unknown:
            raise RequestError(400, f"unsupported request field(s) {', '.join(map(repr, unknown))} for "
                                    f"{'chat completions' if chat else 'completions'}", param=unknown[0])
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(400, f"unknown model {model!r}: this server serves {self.model_name!r}",
                               "invalid_request_error", "model")
        _field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request)")
        _field(body, "user", (str,), None)
        self._reject_unsupported(body, chat)
        stream = _field(body, "stream", (bool,), False)
        stream_options = _field(body, "stream_options", (dict,), {})
        if stream_options and not stream:
            raise RequestError(400, "'stream_options' needs 'stream': true", param="stream_options")
        if set(stream_options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' takes only 'include_usage'", param="stream_options")
        include_usage = _field(stream_options, "include_usage", (bool,), False)
        default_max = None if chat else 16   # OpenAI's defaults: chat runs to the end, completions 16 tokens
        max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                            else "max_tokens", (int,), default_max, lambda v: v >= 1, "an integer >= 1")
        temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"))
        top_p = float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]"))
        top_k = _field(body, "top_k", (int,), 0, lambda v: 0 <= v <= 1 << 31, "an integer >= 0")
        seed = _field(body, "seed", (int,), None, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1],
                      "an integer in [-2^63, 2^64-1]")
        ignore_eos = _field(body, "ignore_eos", (bool,), False)   # vLLM's extension, for benchmarks
        stops = self._stop_strings(body.get("stop"))
        logprobs, top_logprobs = self._logprobs_fields(body, chat)
        echo = False if chat else _field(body, "echo", (bool,), False)
        if echo and logprobs:
            raise RequestError(400, "'echo' with 'logprobs' (log-probabilities of the prompt's tokens) is not "
                                    "supported; drop one of them", param="echo")
        prompt_ids, prompt_text = self._prompt(body, chat)
        try:
            self.engine.check_prompt(prompt_ids)
        except LowbitError as exc:
            raise RequestError(400, str(exc), param="messages" if chat else "prompt") from exc
        room = self.engine.context - len(prompt_ids)
        params = SamplingParams(max_new_tokens=min(max_tokens or room, room), temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed,
                                stop_token_ids=() if ignore_eos else self.stop_token_ids)
        if echo and prompt_text is None:
            with self.tokenizers.borrow() as tokenizer:
                prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        request = GenerationRequest(prompt_ids, params, stops, stop_on_eos=not ignore_eos, logprobs=logprobs,
                                    top_logprobs=top_logprobs, echo=prompt_text if echo else None,
                                    include_usage=include_usage)
        return request, stream

    @staticmethod
    def _reject_unsupported(body: dict, chat: bool) -> None:
        """Fields lowbit accepts at their neutral value only, so a request relying on them is refused."""
        for name in ("presence_penalty", "frequency_penalty"):
            if _field(body, name, (int, float), 0, lambda v: -2 <= v <= 2, "in [-2, 2]"):
                raise RequestError(400, f"'{name}' is not supported (only 0)", param=name)
        if _field(body, "logit_bias", (dict,), {}):
            raise RequestError(400, "'logit_bias' is not supported (only an empty object)", param="logit_bias")
        if not chat:
            _field(body, "best_of", (int,), 1, lambda v: v == 1, "1")
            if _field(body, "suffix", (str,), ""):
                raise RequestError(400, "'suffix' (insertion) is not supported", param="suffix")
            return
        if _field(body, "tools", (list,), []):
            raise RequestError(400, "'tools' (function calling) is not supported", param="tools")
        if _field(body, "tool_choice", (str, dict), "none") not in ("none", "auto"):
            raise RequestError(400, "'tool_choice' needs tools, which are not supported", param="tool_choice")
        response_format = _field(body, "response_format", (dict,), {"type": "text"})
        if response_format.get("type") != "text":
            raise RequestError(400, "'response_format' other than text (JSON mode) is not supported",
                               param="response_format")
        _field(body, "parallel_tool_calls", (bool,), None)
        _field(body, "store", (bool,), None)
        _field(body, "metadata", (dict,), None)
        _field(body, "service_tier", (str,), None)

    @staticmethod
    def _stop_strings(stop: Any) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
        if not isinstance(stops, list | tuple) or len(stops) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings, each "
                                    f"1 to {MAX_STOP_CHARS} characters", param="stop")
        return tuple(stops)

    @staticmethod
    def _logprobs_fields(body: dict, chat: bool) -> tuple[bool, int]:
        """(logprobs wanted, how many alternatives per token), in chat's or completions' way of asking."""
        if chat:
            wanted = _field(body, "logprobs", (bool,), False)
            top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                         f"an integer in [0, {MAX_TOP_LOGPROBS}]")
            if top and not wanted:
                raise RequestError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return wanted, top
        top = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_COMPLETION_LOGPROBS,
                     f"an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
        return top is not None, top or 0

    def _prompt(self, body: dict, chat: bool) -> tuple[list[int], str | None]:
        """The prompt's token ids, and its text when it came as text."""
        if chat:
            rendered = self._render_chat(body.get("messages"))
            return self._encode(rendered, add_special_tokens=False, param="messages"), rendered
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True, param="prompt"), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            return list(prompt), None
        raise RequestError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")

    def _render_chat(self, messages: Any) -> str:
        """The chat template's text for validated messages (text content only)."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise RequestError(400, f"messages[{i}] needs a 'role' (one of {', '.join(CHAT_ROLES)}) and a "
                                        "'content'", param="messages")
            content = m.get("content")
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if not (isinstance(part, dict) and part.get("type", "text") == "text"
                            and isinstance(part.get("text"), str)):
                        raise RequestError(400, f"messages[{i}].content[{j}] must be a text part "
                                                '{"type": "text", "text": "..."}; this server takes text only',
                                           param="messages")
                content = "".join(part["text"] for part in content)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts",
                                   param="messages")
            clean.append({"role": m["role"], "content": content})
        with self.tokenizers.borrow() as tokenizer:
            if not getattr(tokenizer, "chat_template", None):
                raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions",
                                   param="messages")
            try:
                return tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # templates raise on what they refuse (e.g. roles that do not alternate)
                raise RequestError(400, f"the chat template refused these messages: {exc}",
                                   param="messages") from None

    def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of `text`, refusing text longer than the context after tokenizing only a prefix of it."""
        context = self.engine.context
        window = context * PROMPT_CHARS_PER_TOKEN
        with self.tokenizers.borrow() as tokenizer:
            while True:
                part = text[:window]
                try:
                    ids = tokenizer(part, add_special_tokens=add_special_tokens).input_ids
                except Exception as exc:  # the tokenizer's own refusal of this text
                    raise RequestError(400, f"the tokenizer cannot encode this {param}: {exc}", param=param) from None
                if len(part) == len(text):
                    return [int(t) for t in ids]
                if len(ids) >= context:
                    raise RequestError(400, f"the prompt has more than {len(ids)} tokens (counted in its first "
                                            f"{len(part)} of {len(text)} characters) but the context holds "
                                            f"{context}; shorten the prompt or raise the context (--ctx)",
                                       param=param)
                window *= 4

    # -- results
    def token_text(self, token: int) -> str:
        """A token's own text, for logprobs (with the leading space SentencePiece's "▁" stands for)."""
        text = self._token_texts.get(token)
        if text is None:
            with self.tokenizers.borrow() as tokenizer:
                piece = tokenizer.convert_ids_to_tokens(token)
                text = tokenizer.convert_tokens_to_string([piece]) if isinstance(piece, str) else ""
            if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._token_texts[token] = text
        return text

    def token_logprob(self, token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        """Log-probability of `token` under the model (log-softmax of the raw logits it was sampled from, before
        temperature and top-p, as OpenAI and vLLM report it) and the `top` most likely tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logprobs, top) if top else None
        alternatives = ([(self.token_text(int(i)), float(v)) for v, i in zip(best.values, best.indices)]
                        if best is not None else [])
        return TokenLogprob(self.token_text(token), float(logprobs[token]), alternatives)

    def text_pieces(self, request: GenerationRequest, client_gone) -> Iterator[Piece]:
        """Pieces as tokens arrive; stops at a stop string, cancels on disconnect."""
        detok = IncrementalDetokenizer(self.tokenizers)
        text, shown = "", 0
        entries: list[TokenLogprob] = []
        hold = max((len(s) for s in request.stop_strings), default=1) - 1
        while True:
            try:
                kind, value = request.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if client_gone():
                    request.cancelled.set()
                    self.scheduler.wakeup_now()
                    return
                continue
            if kind == "error":
                raise value
            if kind == "done":
                text += detok.flush()
                yield Piece(text[shown:], value, entries)
                return
            token, logits = value
            if token in request.params.stop_token_ids:
                continue    # the end-of-turn token ends the text; the "done" event follows
            if request.logprobs:
                entries.append(self.token_logprob(token, logits, request.top_logprobs))
            new = detok.add(token)
            if not new:
                continue    # an incomplete multi-byte character: wait for the next token
            text += new
            cut = min((i for i in (text.find(s, max(0, shown - hold)) for s in request.stop_strings) if i >= 0),
                      default=-1)
            if cut >= 0:
                request.cancelled.set()
                yield Piece(text[shown:cut], "stop", entries)
                return
            safe = len(text) - hold if request.stop_strings else len(text)
            if safe > shown:
                yield Piece(text[shown:safe], None, entries)
                entries = []
                shown = safe

    def usage(self, request: GenerationRequest) -> dict[str, int]:
        completion = len(request.sequence.generated) if request.sequence else 0
        return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(request.prompt_ids) + completion}


# -- HTTP ------------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Routes the OpenAI endpoints; one instance per connection, on a worker thread. Every answer, errors
    included (404, 405, 413, malformed request lines), is JSON in OpenAI's error shape, never HTML."""

    server_version = "lowbit"
    protocol_version = "HTTP/1.0"   # one request per connection: streams end when the connection closes
    service: Service
    server: BoundedHTTPServer

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), fmt % args)

    def setup(self) -> None:
        limits = self.service.limits
        self.timeout = limits.idle_timeout       # per read, applied by StreamRequestHandler.setup
        super().setup()
        self.deadline = self.server.watchdog.arm(self.connection, limits.read_timeout)
        self.body_read = False

    def handle(self) -> None:
        try:
            self.handle_one_request()
        except OSError:
            pass   # the client went away mid-request
        except Exception:   # a bug: answer 500 (JSON) and keep serving
            log.exception("unexpected error answering %s %s", self.command, self.path)
            with contextlib.suppress(OSError):
                self._send_error(RequestError(500, "internal server error", "server_error"))
        finally:
            self.server.watchdog.disarm(self.deadline)

    # -- plumbing
    def _send_json(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error_payload(error.status, error.message, error.kind, error.param),
                        error.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, header too long, unknown method) as JSON, not HTML."""
        self.request_version = self.protocol_version   # never answer in HTTP/0.9, which has no status line
        if code == 501:   # no do_<METHOD>: a method no route takes
            self._send_error(self._method_error())
            return
        self.close_connection = True
        if self.deadline.expired:   # the watchdog cut a slow request line or headers off mid-way
            code, message = 408, f"the request did not arrive within {self.service.limits.read_timeout:g} s"
        self._send_error(RequestError(code, message or explain or self.responses.get(code, ("error",))[0]))

    def _method_error(self) -> RequestError:
        path = self.path.split("?", 1)[0]
        if path not in ROUTES:
            return RequestError(404, f"no route {path}; try /v1/completions, /v1/chat/completions, /v1/models or "
                                     "/health", "not_found_error")
        return RequestError(405, f"{path} takes {ROUTES[path]}, not {self.command}", "invalid_request_error",
                            headers={"Allow": ROUTES[path]})

    def _client_gone(self) -> bool:
        """True once the client closed its end (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_body(self) -> bytes:
        """The request body, refused before reading when it is too large; the read deadline ends here."""
        limits = self.service.limits
        if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
            raise RequestError(411, "send the body with a Content-Length (chunked transfer is not supported)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
        if length < 0:
            raise RequestError(400, "bad Content-Length header")
        if length > limits.max_body_bytes:
            raise RequestError(413, f"the request body has {length} bytes; this server takes at most "
                                    f"{limits.max_body_bytes} (--max-body-mb)")
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:   # no byte for idle_timeout (the stdlib would close without a word)
            raise RequestError(408, f"the request body stalled for {limits.idle_timeout:g} s") from None
        self.body_read = True
        self.server.watchdog.disarm(self.deadline)
        if len(raw) < length:
            if self.deadline.expired:
                raise RequestError(408, f"the request did not arrive within {limits.read_timeout:g} s")
            raise ConnectionResetError("the client closed the connection mid-body")
        self.connection.settimeout(limits.write_timeout)
        return raw

    def _read_json(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:   # ValueError covers bad JSON and bad UTF-8
            reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise RequestError(400, f"the request body is not valid JSON ({reason})") from None

    # -- routes
    def _dispatch(self) -> None:
        try:
            path = self.path.split("?", 1)[0]
            if ROUTES.get(path) != self.command:
                raise self._method_error()
            if path not in PUBLIC_ROUTES and not self.service.authorized(self.headers.get("Authorization")):
                raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   "invalid_request_error", headers={"WWW-Authenticate": "Bearer"})
            if self.command == "GET":
                self._get(path)
            else:
                self._post(path == "/v1/chat/completions")
        except RequestError as exc:
            self.server.watchdog.disarm(self.deadline)
            self._send_error(exc)
            if not self.body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                # Closing with unread bytes resets the connection, and the client may lose the answer: the
                # watchdog drains what the client still sends, then closes.
                self.server.watchdog.linger(self.connection.dup())

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _get(self, path: str) -> None:
        service = self.service
        self.server.watchdog.disarm(self.deadline)
        if path == "/health":
            payload = {"status": "ok", "model": service.model_name, "running": len(service.scheduler.running),
                       "waiting": len(service.scheduler.pending)}
        else:
            payload = {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                  "created": service.created, "owned_by": "lowbit"}]}
        self._send_json(200, json.dumps(payload).encode())

    def _post(self, chat: bool) -> None:
        request, stream = self.service.parse(self._read_json(), chat)
        self.service.scheduler.submit(request)
        try:
            if stream:
                self._stream(request, chat)
            else:
                self._complete(request, chat)
        except OSError:   # the client went away, or stopped reading for write_timeout
            request.cancelled.set()
        except RequestError as exc:
            with contextlib.suppress(OSError):
                self._send_error(exc)
        finally:
            request.cancelled.set()   # frees the slot if the request is still running for any reason
            self.service.scheduler.wakeup_now()

    def _complete(self, request: GenerationRequest, chat: bool) -> None:
        text, reason, entries = [], None, []
        for piece in self.service.text_pieces(request, self._client_gone):
            text.append(piece.text)
            entries.extend(piece.logprobs)
            reason = piece.finish or reason
        if reason is None:
            return   # the client went away
        created, body = int(time.time()), "".join(text)
        if chat:
            logprobs = {"content": [e.chat() for e in entries], "refusal": None} if request.logprobs else None
            payload = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                       "model": self.service.model_name,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": body},
                                    "finish_reason": reason, "logprobs": logprobs}]}
        else:
            echo = request.echo or ""
            logprobs = completion_logprobs(entries, len(echo)) if request.logprobs else None
            payload = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                       "model": self.service.model_name,
                       "choices": [{"index": 0, "text": echo + body, "finish_reason": reason,
                                    "logprobs": logprobs}]}
        payload["usage"] = self.service.usage(request)
        self._send_json(200, json.dumps(payload).encode())

    def _stream(self, request: GenerationRequest, chat: bool) -> None:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), self.service.model_name
        started = False
        offset = len(request.echo or "")

        def event(chunk_choices: list[dict], usage: dict | None = None) -> bytes:
            chunk = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model, "choices": chunk_choices}
            if request.include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        def choice(text: str, finish: str | None, entries: list[TokenLogprob], first: bool = False) -> dict:
            nonlocal offset
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                logprobs = {"content": [e.chat() for e in entries], "refusal": None} if request.logprobs else None
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            logprobs = completion_logprobs(entries, offset) if request.logprobs else None
            offset += len(text)
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}

        for piece in self.service.text_pieces(request, self._client_gone):
            if not started:
                # Headers go out with the first token, so an error before it can still be a plain 400/500.
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                started = True
                if chat:
                    self.wfile.write(event([choice("", None, [], first=True)]))
                elif request.echo:
                    self.wfile.write(event([choice(request.echo, None, [])]))
            if piece.text or piece.logprobs:
                self.wfile.write(event([choice(piece.text, None, piece.logprobs)]))
            if piece.finish is not None:
                self.wfile.write(event([choice("", piece.finish, [])]))
                if request.include_usage:
                    self.wfile.write(event([], self.service.usage(request)))
                self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()


class Server:
    """A running server (in background threads): `url`, `close()`; also a context manager."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 max_queue: int = 64, limits: ServerLimits | None = None, api_key: str | None = None):
        if max_queue < 0:
            raise LowbitError(f"--max-queue must be >= 0 (got {max_queue})")
        self.service = Service(engine, tokenizer, model_name, max_queue, limits, api_key)
        handler = type("BoundHandler", (Handler,), {"service": self.service})
        try:
            self.httpd = BoundedHTTPServer((host, port), handler, self.service.limits)
        except OSError as exc:
            raise LowbitError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from exc
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C), then stop cleanly: HTTP in a background thread, generation in this
        one (see `Scheduler.run`)."""
        self._start_http()
        try:
            self.service.scheduler.run()
        finally:
            self.close()

    def start_background(self) -> Server:
        """Serve from background threads (HTTP and generation); returns at once."""
        self._start_http()
        self.service.scheduler.start()
        return self

    def _start_http(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lowbit-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
        self.service.scheduler.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(model: Any, tokenizer: Any, model_name: str = "lowbit", host: str = "127.0.0.1", port: int = 0,
                 max_batch: int = 8, max_queue: int = 64, context: int | None = None, threads: int | None = None,
                 limits: ServerLimits | None = None, api_key: str | None = None) -> Server:
    """Start serving `model` in background threads (port 0: any free port); returns the Server.

    Generation then runs in a thread of its own, which on a machine with few cores is slower (see
    `Scheduler.run`); for full speed build a `Server` and call `serve_forever()` from the main thread."""
    engine = Engine(model, tokenizer, max_batch=max_batch, context=context, threads=threads)
    return Server(engine, tokenizer, model_name, host, port, max_queue, limits, api_key).start_background()
