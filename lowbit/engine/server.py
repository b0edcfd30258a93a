"""An OpenAI-compatible HTTP server over lowbit's engine, with continuous batching.

Threads: one HTTP handler thread per connection (stdlib ThreadingHTTPServer, no extra dependency) parses and
validates the request, tokenizes it and queues it; ONE scheduler thread owns the engine: it admits queued
requests into free cache slots (prefill), then decodes one token for every running sequence in a single
batched step, and hands each new token to its request's handler, which detokenizes it and writes it to the
client. A client that disconnects marks its request cancelled; the scheduler frees its slot at the next step.
At most `max_queue` requests wait for a slot; beyond that the server answers 429.
"""
from __future__ import annotations

import collections
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lowbit.engine.generate import SamplingParams, encode_prompt, stop_ids
from lowbit.engine.runner import Engine, Sequence
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

MAX_STOP_STRINGS = 4
POLL_SECONDS = 0.05


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and an OpenAI-style error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class GenerationRequest:
    """A validated request travelling from its handler thread to the scheduler and back."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: tuple[str, ...] = ()
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_on_eos: bool = True
    sequence: Sequence | None = None
    queued_at: float = field(default_factory=time.monotonic)


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
                                        f"slot (limit {self.max_queue}); retry later", "rate_limit_exceeded")
            self.pending.append(request)
            self.wakeup.notify()

    def _admit(self) -> None:
        while self.engine.free_slots:
            with self.wakeup:
                if not self.pending:
                    return
                request = self.pending.popleft()
            if request.cancelled.is_set():
                request.events.put(("done", "cancelled"))
                continue
            try:
                seq = self.engine.start(request.prompt_ids, request.params, request.stop_on_eos)
            except LowbitError as exc:
                request.events.put(("error", RequestError(400, str(exc))))
                continue
            except Exception as exc:  # e.g. out of memory in the prefill: fail this request, keep serving
                log.exception("prefill failed")
                request.events.put(("error", RequestError(500, f"prefill failed: {exc}", "server_error")))
                continue
            request.sequence = seq
            self.running[seq.slot] = request
            request.events.put(("token", seq.generated[-1]))

    def _retire(self) -> None:
        for slot, request in list(self.running.items()):
            seq = request.sequence
            if request.cancelled.is_set() and not seq.finished:
                seq.finish_reason = "cancelled"
            if seq.finished:
                self.engine.release(seq)
                del self.running[slot]
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
                        self.running[seq.slot].events.put(("token", seq.generated[-1]))
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


class Service:
    """What the HTTP handlers share: the model name, tokenizer, engine limits and the scheduler."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_queue: int):
        if tokenizer is None:
            raise LowbitError("serving needs a tokenizer; this model has none")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.scheduler = Scheduler(engine, max_queue)
        self.tokenizer_lock = threading.Lock()   # HF fast tokenizers are not safe to share across threads
        self.stop_token_ids = stop_ids(tokenizer)

    def parse(self, body: Any, chat: bool) -> tuple[GenerationRequest, bool]:
        """A GenerationRequest and the stream flag from an OpenAI request body, or RequestError(400)."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(400, f"unknown model {model!r}: this server serves {self.model_name!r}",
                               "invalid_request_error", "model")
        n = _field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request)")
        del n
        stream = _field(body, "stream", (bool,), False)
        default_max = None if chat else 16   # OpenAI's defaults: chat runs to the end, completions 16 tokens
        max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                            else "max_tokens", (int,), default_max, lambda v: v >= 1, "an integer >= 1")
        temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"))
        top_p = float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]"))
        top_k = _field(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0")
        seed = _field(body, "seed", (int,), None)
        ignore_eos = _field(body, "ignore_eos", (bool,), False)   # vLLM's extension, for benchmarks
        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops) \
                or len(stops) > MAX_STOP_STRINGS:
            raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS}",
                               param="stop")
        prompt_ids = self._prompt_ids(body, chat)
        try:
            self.engine.check_prompt(prompt_ids)
        except LowbitError as exc:
            raise RequestError(400, str(exc), param="messages" if chat else "prompt") from exc
        room = self.engine.context - len(prompt_ids)
        params = SamplingParams(max_new_tokens=min(max_tokens or room, room), temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed,
                                stop_token_ids=() if ignore_eos else self.stop_token_ids)
        return GenerationRequest(prompt_ids, params, tuple(stops), stop_on_eos=not ignore_eos), stream

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "'messages' must be a non-empty list", param="messages")
            clean = []
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise RequestError(400, "each message needs a 'role' and a 'content'", param="messages")
                content = m.get("content")
                if isinstance(content, list):   # content parts: keep the text ones
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if not isinstance(content, str):
                    raise RequestError(400, "message 'content' must be a string or text parts", param="messages")
                clean.append({"role": m["role"], "content": content})
            with self.tokenizer_lock:
                try:
                    return [int(t) for t in encode_prompt(self.tokenizer, "", messages=clean)]
                except LowbitError as exc:
                    raise RequestError(400, str(exc), param="messages") from exc
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self.tokenizer_lock:
                return [int(t) for t in encode_prompt(self.tokenizer, prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            return list(prompt)
        raise RequestError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")

    def text_pieces(self, request: GenerationRequest, client_gone) -> Iterator[tuple[str, str | None]]:
        """(new text, finish reason or None) as tokens arrive; stops at a stop string, cancels on disconnect."""
        ids: list[int] = []
        shown = 0
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
                with self.tokenizer_lock:
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                yield text[shown:], value
                return
            if value in request.params.stop_token_ids:
                continue    # the end-of-turn token ends the text; the "done" event follows
            ids.append(value)
            with self.tokenizer_lock:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue    # an incomplete multi-byte character: wait for the next token
            cut = min((i for i in (text.find(s, max(0, shown - hold)) for s in request.stop_strings) if i >= 0),
                      default=-1)
            if cut >= 0:
                request.cancelled.set()
                yield text[shown:cut], "stop"
                return
            safe = len(text) - hold if request.stop_strings else len(text)
            if safe > shown:
                yield text[shown:safe], None
                shown = safe

    def usage(self, request: GenerationRequest) -> dict[str, int]:
        completion = len(request.sequence.generated) if request.sequence else 0
        return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(request.prompt_ids) + completion}


# -- HTTP ------------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Routes the OpenAI endpoints; one instance per connection, on its own thread."""

    server_version = "lowbit"
    protocol_version = "HTTP/1.0"   # one request per connection: streams end when the connection closes
    service: Service

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), fmt % args)

    # -- plumbing
    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, {"error": {"message": error.message, "type": error.kind,
                                                 "param": error.param, "code": error.status}})

    def _client_gone(self) -> bool:
        """True once the client closed its end (readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})") from None

    # -- routes
    def do_GET(self) -> None:
        service = self.service
        if self.path == "/health":
            self._send_json(200, {"status": "ok", "model": service.model_name,
                                  "running": len(service.scheduler.running),
                                  "waiting": len(service.scheduler.pending)})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                             "created": service.created, "owned_by": "lowbit"}]})
        else:
            self._send_error(RequestError(404, f"no route {self.path}; try /v1/completions, "
                                               "/v1/chat/completions, /v1/models or /health", "not_found"))

    def do_POST(self) -> None:
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._send_error(RequestError(404, f"no route {self.path}", "not_found"))
            return
        try:
            request, stream = self.service.parse(self._read_json(), chat)
            self.service.scheduler.submit(request)
        except RequestError as exc:
            self._send_error(exc)
            return
        try:
            if stream:
                self._stream(request, chat)
            else:
                self._complete(request, chat)
        except (BrokenPipeError, ConnectionResetError):
            request.cancelled.set()
        except RequestError as exc:
            try:
                self._send_error(exc)
            except OSError:
                pass
        finally:
            request.cancelled.set()   # frees the slot if the request is still running for any reason
            self.service.scheduler.wakeup_now()

    def _complete(self, request: GenerationRequest, chat: bool) -> None:
        text, reason = [], None
        for piece, finish in self.service.text_pieces(request, self._client_gone):
            text.append(piece)
            reason = finish or reason
        if reason is None:
            return   # the client went away
        created, body = int(time.time()), "".join(text)
        if chat:
            payload = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                       "model": self.service.model_name,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": body},
                                    "finish_reason": reason, "logprobs": None}]}
        else:
            payload = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                       "model": self.service.model_name,
                       "choices": [{"index": 0, "text": body, "finish_reason": reason, "logprobs": None}]}
        payload["usage"] = self.service.usage(request)
        self._send_json(200, payload)

    def _stream(self, request: GenerationRequest, chat: bool) -> None:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), self.service.model_name
        started = False

        def event(piece: str, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [choice]}
            else:
                chunk = {"id": ident, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        for piece, finish in self.service.text_pieces(request, self._client_gone):
            if not started:
                # Headers go out with the first token, so an error before it can still be a plain 400/500.
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                started = True
                if chat:
                    self.wfile.write(event("", None, first=True))
            if piece:
                self.wfile.write(event(piece, None))
            if finish is not None:
                self.wfile.write(event("", finish))
                self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()


class Server:
    """A running server (in background threads): `url`, `close()`; also a context manager."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 max_queue: int = 64):
        if max_queue < 0:
            raise LowbitError(f"--max-queue must be >= 0 (got {max_queue})")
        self.service = Service(engine, tokenizer, model_name, max_queue)
        handler = type("BoundHandler", (Handler,), {"service": self.service})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise LowbitError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from exc
        self.httpd.daemon_threads = True
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
                 max_batch: int = 8, max_queue: int = 64, context: int | None = None, threads: int | None = None
                 ) -> Server:
    """Start serving `model` in background threads (port 0: any free port); returns the Server.

    Generation then runs in a thread of its own, which on a machine with few cores is slower (see
    `Scheduler.run`); for full speed build a `Server` and call `serve_forever()` from the main thread."""
    engine = Engine(model, tokenizer, max_batch=max_batch, context=context, threads=threads)
    return Server(engine, tokenizer, model_name, host, port, max_queue).start_background()
