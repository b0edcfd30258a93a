"""`lowbit serve` under load and abuse: every request answered or cleanly refused, memory flat across rounds.

Starts `lowbit serve` on stories260K (from LOWBIT_SHARED, with a chat template added to a temporary copy) as its
own process on 127.0.0.1, then sends --requests requests (default 1,000) from --clients concurrent clients (default
100) in --rounds rounds. Each request is one of (seeded mix):
  completion        non-streaming completion
  completion-stream streaming completion (with logprobs on every third)
  chat-stream       streaming chat completion
  early-disconnect  streaming, hangs up after two events
  slow-sender       sends its request in small pieces over ~2 s (within the read deadline): must still be served
  stalled-sender    sends half its body, then nothing (must get 408 at the read deadline)
  oversized         declares an 8 MB body (the limit is 4 MB) and starts sending it: must get 413
  invalid           a lone surrogate in the prompt: must get 400
Outcomes per request: its HTTP status, "client-disconnect" for the deliberate hang-ups, or the connection error.
The server's resident memory and thread count are read from /proc before the first round (round 0, idle after
loading) and after each round.

Prints a table and writes bench/results/server_load.json.
Usage: python bench/bench_server_load.py [--requests 1000] [--clients 100] [--rounds 5] [--max-seconds 900]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
HOST = "127.0.0.1"    # loopback only: this bench never sends to another machine
MODEL = "stories"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
KINDS = {  # kind: share of the requests
    "completion": 0.22, "completion-stream": 0.2, "chat-stream": 0.18, "early-disconnect": 0.12,
    "slow-sender": 0.1, "stalled-sender": 0.03, "oversized": 0.1, "invalid": 0.05,
}
READ_TIMEOUT = 5.0
CLIENT_TIMEOUT = 120.0
PROMPTS = ["Once upon a time", "Tom had a red ball", "The little cat", "Lily wanted to", "One day, a big dog"]


def model_folder(tmp: Path) -> Path:
    """A copy of stories260K whose tokenizer has a chat template (the shared copy has none)."""
    source = SHARED / "models" / "stories260K"
    if not source.is_dir():
        sys.exit(f"stories260K not found at {source}: set LOWBIT_SHARED to the shared data folder")
    target = tmp / "stories260K"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.bin"))
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "lowbit.cli", "serve", str(folder), "--host", HOST, "--port", str(port),
               "--threads", str(args.threads), "--ctx", "256", "--max-batch", str(args.max_batch),
               "--max-queue", str(args.max_queue), "--model-name", MODEL, "--read-timeout", str(READ_TIMEOUT)]
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lowbit serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            status, _ = exchange(port, "GET", "/health", b"", timeout=2)
            if status == "200":
                return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    sys.exit("lowbit serve did not answer within 120 s")


def proc_status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            fields[key] = int(value)
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1),
            "threads": fields["Threads"]}


def request_bytes(method: str, path: str, body: bytes, declared: int | None = None) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def read_status(sock: socket.socket) -> tuple[str, bytes]:
    """The status code of the response on `sock` and what was read so far."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed before a status line") if not data else ValueError(data[:80])
        data += chunk
    return data.split(b" ", 2)[1].decode(), data


def exchange(port: int, method: str, path: str, body: bytes, timeout: float = CLIENT_TIMEOUT) -> tuple[str, bytes]:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request_bytes(method, path, body))
        status, data = read_status(sock)
        while chunk := sock.recv(65536):
            data += chunk
    return status, data


def one_request(port: int, kind: str, rng: random.Random) -> str:
    """Run one request of `kind`; its outcome class."""
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(8, 48)
    completion = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                  "seed": rng.randrange(1 << 32)}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True}
    try:
        if kind == "completion":
            return exchange(port, "POST", "/v1/completions", json.dumps(completion).encode())[0]
        if kind == "completion-stream":
            body = {**completion, "stream": True, **({"logprobs": 2} if rng.random() < 1 / 3 else {})}
            status, data = exchange(port, "POST", "/v1/completions", json.dumps(body).encode())
            return status if status != "200" or data.rstrip().endswith(b"data: [DONE]") else "200-truncated"
        if kind == "chat-stream":
            status, data = exchange(port, "POST", "/v1/chat/completions", json.dumps(chat).encode())
            return status if status != "200" or data.rstrip().endswith(b"data: [DONE]") else "200-truncated"
        if kind == "invalid":
            body = b'{"model": "stories", "prompt": "a lone \\ud800 surrogate"}'
            return exchange(port, "POST", "/v1/completions", body)[0]
        with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as sock:
            if kind == "early-disconnect":
                sock.sendall(request_bytes("POST", "/v1/completions",
                                           json.dumps({**completion, "max_tokens": 200, "stream": True}).encode()))
                status, data = read_status(sock)
                while status == "200" and data.count(b"data: ") < 2:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return "200-truncated"
                    data += chunk
                return "client-disconnect" if status == "200" else status
            if kind == "oversized":
                size = 8 << 20
                sock.sendall(request_bytes("POST", "/v1/completions", b"", declared=size))
                sent = 0
                try:   # keep sending until the server answers; it must answer without reading it all
                    while sent < size:
                        sock.sendall(b"x" * (1 << 16))
                        sent += 1 << 16
                        if sent >= 1 << 20:
                            break
                except OSError:
                    pass
                return read_status(sock)[0]
            raw = request_bytes("POST", "/v1/completions", json.dumps(completion).encode())
            if kind == "slow-sender":
                for begin in range(0, len(raw), max(1, len(raw) // 10)):
                    sock.sendall(raw[begin:begin + max(1, len(raw) // 10)])
                    time.sleep(0.2)
            else:   # stalled-sender: half the request, then silence until the server gives up
                sock.sendall(raw[:len(raw) // 2 + 80])
            status, data = read_status(sock)
            while chunk := sock.recv(65536):
                data += chunk
            return status
    except (OSError, ValueError) as exc:
        return f"connection-error:{type(exc).__name__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the server's compute threads")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending new requests after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(RESULTS / "server_load.json"))
    args = parser.parse_args()
    if not (1 <= args.requests <= 20000 and 1 <= args.clients <= 1000 and 1 <= args.rounds <= args.requests):
        sys.exit("--requests in [1, 20000], --clients in [1, 1000], --rounds in [1, --requests]")

    rng = random.Random(args.seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=args.requests)
    seeds = [rng.randrange(1 << 32) for _ in kinds]
    with tempfile.TemporaryDirectory(prefix="lowbit-load-") as tmp:
        port = free_port()
        proc = start_server(model_folder(Path(tmp)), port, args)
        began = time.monotonic()
        outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        rounds = [{"round": 0, "requests": 0, "seconds": 0.0, **proc_status(proc.pid), "outcomes": {}}]
        try:
            per_round = -(-args.requests // args.rounds)
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                for r in range(args.rounds):
                    batch = range(r * per_round, min(args.requests, (r + 1) * per_round))
                    if time.monotonic() - began > args.max_seconds:
                        break
                    round_began = time.monotonic()
                    futures = {pool.submit(one_request, port, kinds[i], random.Random(seeds[i])): kinds[i]
                               for i in batch}
                    round_counts = collections.Counter()
                    for future in concurrent.futures.as_completed(futures):
                        outcome = future.result()
                        outcomes[futures[future]][outcome] += 1
                        round_counts[outcome] += 1
                    time.sleep(READ_TIMEOUT + 1)    # let the server drop what the round left behind
                    stats = proc_status(proc.pid)
                    rounds.append({"round": r + 1, "requests": len(batch), "seconds": round(time.monotonic()
                                                                                             - round_began, 1),
                                   **stats, "outcomes": dict(round_counts)})
                    print(f"round {r + 1}: {len(batch)} requests in {rounds[-1]['seconds']} s, server RSS "
                          f"{stats['rss_mb']} MB, {stats['threads']} threads, {dict(round_counts)}", flush=True)
            alive = proc.poll() is None
            health = exchange(port, "GET", "/health", b"", timeout=10)[0] if alive else "dead"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        elapsed = time.monotonic() - began

    totals = collections.Counter()
    for counts in outcomes.values():
        totals.update(counts)
    report = {"requests": sum(totals.values()), "clients": args.clients, "rounds": rounds,
              "server": {"model": "stories260K", "threads": args.threads, "max_batch": args.max_batch,
                         "max_queue": args.max_queue, "read_timeout": READ_TIMEOUT, "ctx": 256},
              "outcomes": dict(totals), "outcomes_by_kind": {k: dict(v) for k, v in sorted(outcomes.items())},
              "server_alive_after": alive, "health_after": health, "exit_code": proc.returncode,
              "seconds": round(elapsed, 1),
              "rss_growth_mb_after_first_round": round(rounds[-1]["rss_mb"] - rounds[1]["rss_mb"], 1)
              if len(rounds) > 1 else None}
    columns = sorted(totals)
    print(f"\n{report['requests']} requests from {args.clients} clients in {elapsed:.0f} s; server alive after: "
          f"{alive}, /health {health}\n")
    print("| kind | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for kind, counts in sorted(outcomes.items()):
        print(f"| {kind} | " + " | ".join(str(counts.get(c, 0)) for c in columns) + " |")
    print("| **all** | " + " | ".join(str(totals[c]) for c in columns) + " |")
    print("\n| round | requests | seconds | server RSS MB | threads |\n|---|---|---|---|---|")
    for row in rounds:
        print(f"| {row['round']} | {row['requests']} | {row['seconds']} | {row['rss_mb']} | {row['threads']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from lowbit.formats.atomic import atomic_file

    with atomic_file(args.json) as tmp_json:
        tmp_json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
