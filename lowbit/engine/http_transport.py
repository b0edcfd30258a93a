"""The server's HTTP transport and its limits: a bounded worker pool, a deadline for reading each request, lingering
closes for refused connections, and OpenAI-shaped error bodies.

The stdlib's ThreadingHTTPServer starts one thread per connection with no bound and no deadline: 456 idle
connections made 462 threads. Here a fixed number of workers handle connections, a bounded number wait for a
worker, and the rest get a 503 from the accepting thread at once. A watchdog thread gives each request a total
deadline for its headers and body (a per-read timeout alone lets a client sending one byte every few seconds hold
a worker forever) and drains refused connections before closing them, so the client reads the refusal instead of
a connection reset.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import HTTPServer
from typing import Any, Callable

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

WATCHDOG_TICK_SECONDS = 0.05
MAX_LINGERING = 1024      # refused connections being drained at once; beyond this they are closed at once
LINGER_SECONDS = 2.0      # how long a refused connection is drained (Apache's lingering close waits 2 s per read)


@dataclass
class ServerLimits:
    """What one client may cost the server (defaults sized for hundreds of concurrent clients)."""

    max_body_bytes: int = 4 << 20      # request body; larger ones get 413 before they are read
    http_workers: int = 128            # connections handled at once (a streaming request holds one)
    waiting_connections: int = 512     # accepted connections waiting for a worker; more get 503
    listen_backlog: int = 1024         # kernel queue of connections not yet accepted (capped by somaxconn)
    read_timeout: float = 30.0         # the whole request (headers and body) must arrive within this
    idle_timeout: float = 10.0         # no byte for this long while reading a request closes the connection
    write_timeout: float = 60.0        # a client that stops reading its response for this long is dropped
    max_json_depth: int = 32           # nesting of the request body's JSON

    def validate(self) -> ServerLimits:
        for name in ("max_body_bytes", "http_workers", "listen_backlog", "max_json_depth"):
            if getattr(self, name) < 1:
                raise LowbitError(f"server limit {name} must be >= 1 (got {getattr(self, name)})")
        if self.waiting_connections < 0:
            raise LowbitError(f"server limit waiting_connections must be >= 0 (got {self.waiting_connections})")
        for name in ("read_timeout", "idle_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise LowbitError(f"server limit {name} must be > 0 seconds (got {getattr(self, name)})")
        return self


def error_payload(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
                  ) -> bytes:
    """An error body in OpenAI's shape, which its clients parse for every status."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


def raw_error_response(status: int, message: str, kind: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.0 error response, for answering without a handler (a refused connection)."""
    body = error_payload(status, message, kind)
    head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra_headers}\r\n")
    return head.encode() + body


class Deadline:
    """A connection's deadline for reading its request; `expired` once the watchdog cut the reading off."""

    __slots__ = ("sock", "at", "expired")

    def __init__(self, sock: socket.socket, at: float):
        self.sock, self.at, self.expired = sock, at, False


class Watchdog:
    """One thread that ends requests read too slowly and drains refused connections before closing them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: set[Deadline] = set()
        self._selector = selectors.DefaultSelector()
        self._lingering: dict[socket.socket, float] = {}
        self._new_lingering: list[tuple[socket.socket, float]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lowbit-http-watchdog", daemon=True)
        self._thread.start()

    def arm(self, sock: socket.socket, seconds: float) -> Deadline:
        deadline = Deadline(sock, time.monotonic() + seconds)
        with self._lock:
            self._armed.add(deadline)
        return deadline

    def disarm(self, deadline: Deadline) -> None:
        with self._lock:
            self._armed.discard(deadline)

    def linger(self, sock: socket.socket, seconds: float = LINGER_SECONDS) -> None:
        """Take over a socket whose response is sent: stop writing, discard what the client still sends (so closing
        does not reset the connection before the client read the response), close it on EOF or after `seconds`."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        with self._lock:
            if len(self._lingering) + len(self._new_lingering) >= MAX_LINGERING:
                sock.close()
                return
            self._new_lingering.append((sock, time.monotonic() + seconds))

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for sock in list(self._lingering):
            sock.close()
        self._selector.close()

    @property
    def lingering(self) -> int:
        with self._lock:
            return len(self._lingering) + len(self._new_lingering)

    def _run(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            with self._lock:
                expired = [d for d in self._armed if d.at <= now]
                self._armed.difference_update(expired)
                fresh, self._new_lingering = self._new_lingering, []
            for deadline in expired:
                # SHUT_RD wakes the handler's blocked read with end-of-file; it sees `expired` and answers 408.
                deadline.expired = True
                with contextlib.suppress(OSError):
                    deadline.sock.shutdown(socket.SHUT_RD)
            for sock, until in fresh:
                try:
                    sock.setblocking(False)
                    self._selector.register(sock, selectors.EVENT_READ)
                    self._lingering[sock] = until
                except (OSError, ValueError):
                    sock.close()
            if self._lingering:
                ready = self._selector.select(timeout=WATCHDOG_TICK_SECONDS)
            else:
                ready = []
                self._stopping.wait(WATCHDOG_TICK_SECONDS)
            now = time.monotonic()
            for key, _ in ready:
                sock = key.fileobj
                try:
                    while sock.recv(1 << 16):
                        pass
                    done = True                          # end of file: the client closed its side
                except BlockingIOError:
                    done = False
                except OSError:
                    done = True
                if done:
                    self._close_lingering(sock)
            for sock, until in list(self._lingering.items()):
                if until <= now:
                    self._close_lingering(sock)

    def _close_lingering(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._lingering.pop(sock, None)
        sock.close()


class WorkerPool:
    """At most `workers` threads, started as needed, running jobs; at most `waiting` jobs queue for a thread."""

    def __init__(self, work: Callable[[Any], None], workers: int, waiting: int):
        self._work = work
        self._max_workers, self._max_waiting = workers, waiting
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # idle threads minus queued jobs no thread has taken yet (negative: jobs wait for a thread)
        self._credit = 0
        self.busy = 0

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, job: Any) -> bool:
        """Queue `job`; False (and nothing queued) when every thread is busy and the waiting queue is full."""
        with self._lock:
            if self._credit <= 0 and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._run, name=f"lowbit-http-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                self._credit += 1
                thread.start()
            if self._credit <= -self._max_waiting:
                return False
            self._credit -= 1
            self._jobs.put(job)
        return True

    def close(self) -> None:
        with self._lock:
            for _ in self._threads:
                self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.busy += 1
            try:
                self._work(job)
            finally:
                with self._lock:
                    self.busy -= 1
                    self._credit += 1


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer whose connections run on a WorkerPool, refused with 503 when it is full."""

    def __init__(self, address: tuple[str, int], handler: type, limits: ServerLimits):
        self.limits = limits
        self.request_queue_size = limits.listen_backlog   # read by server_activate: listen(backlog)
        self.watchdog = Watchdog()
        self.pool = WorkerPool(self._handle, limits.http_workers, limits.waiting_connections)
        self.refused = 0
        try:
            super().__init__(address, handler)
        except BaseException:
            self.watchdog.stop()
            raise

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if self.pool.submit((request, client_address)):
            return
        self.refused += 1
        message = (f"the server is at its connection limit ({self.limits.http_workers} connections being served, "
                   f"{self.limits.waiting_connections} waiting); retry later")
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(raw_error_response(503, message, "server_error", "Retry-After: 1\r\n"))
        self.watchdog.linger(request)

    def _handle(self, job: tuple[socket.socket, Any]) -> None:
        request, client_address = job
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error serving %s", client_address)

    def server_close(self) -> None:
        super().server_close()
        self.pool.close()
        self.watchdog.stop()
