"""The OpenAI-compatible server, driven by the unchanged `openai` client over loopback."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed to test the server (pip install openai)")

from conftest import STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"shared model stories260K not found at {STORIES}")

MODEL = "stories"
@pytest.fixture(scope="module")
def stories(stories_chat):
    return stories_chat


def _start(stories, **kw):
    from lowbit.engine.server import start_server

    return start_server(*stories, model_name=MODEL, context=kw.pop("context", 128), threads=1, **kw)


@pytest.fixture(scope="module")
def server(stories):
    srv = _start(stories, max_batch=4, max_queue=16)
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post_raw(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _greedy_text(stories, prompt: str, n: int) -> str:
    from lowbit.engine.generate import SamplingParams, stop_ids
    from lowbit.engine.runner import Engine

    model, tokenizer = stories
    engine = Engine(model, tokenizer, context=128)
    ids = tokenizer(prompt).input_ids
    tokens = list(engine.generate(ids, SamplingParams(max_new_tokens=n, temperature=0.0,
                                                      stop_token_ids=stop_ids(tokenizer))))
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = _get(server.url + "/health")
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_greedy_equals_engine(stories, client):
    result = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
    assert result.choices[0].text == _greedy_text(stories, "Once upon a time", 30)
    assert result.choices[0].finish_reason in ("length", "stop")
    assert result.usage.prompt_tokens == len(stories[1]("Once upon a time").input_ids)
    assert result.usage.completion_tokens <= 30


def test_streaming_equals_non_streaming(client):
    whole = client.completions.create(model=MODEL, prompt="Tom had a red", max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Tom had a red", max_tokens=25, temperature=0,
                                            stream=True))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_and_chat_stream(client):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == reply.choices[0].message.content


def test_stop_string_cuts_the_text(stories, client):
    full = _greedy_text(stories, "Once upon a time", 30)
    stop = "girl"
    assert stop in full
    result = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0,
                                       stop=stop)
    assert result.choices[0].text == full[:full.index(stop)]
    assert result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="gpt-4", prompt="hi"), "unknown model"),
    (dict(model=MODEL, prompt="hi", temperature=3), "temperature"),
    (dict(model=MODEL, prompt="hi", top_p=0), "top_p"),
    (dict(model=MODEL, prompt="hi", max_tokens=0), "max_tokens"),
    (dict(model=MODEL, prompt="hi", n=2), "'n'"),
    (dict(model=MODEL, prompt="once " * 200), "context holds 128"),
])
def test_bad_requests_get_400(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(**kwargs)


def test_bad_json_and_unknown_route(server):
    status, body = _post_raw(server.url + "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post_raw(server.url + "/v1/completions", b'["a list"]')
    assert status == 400
    status, _ = _post_raw(server.url + "/v1/embeddings", b"{}")
    assert status == 404


def test_concurrent_requests_all_complete(client):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0.8,
                                        seed=i)
        results[i] = out.choices[0].finish_reason

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(10))
    assert set(results.values()) <= {"length", "stop"}


def _slow_steps(srv, seconds: float) -> None:
    """Make each decode step of a test server take at least `seconds`, so requests overlap predictably."""
    engine = srv.service.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    engine.step = slow_step


def test_queue_limit_gives_429(stories):
    srv = _start(stories, max_batch=1, max_queue=1)
    _slow_steps(srv, 0.02)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    outcomes: list[str] = []

    def ask() -> None:
        try:
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")

    try:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)            # one runs, one waits, the rest find the queue full
        for t in threads:
            t.join(timeout=120)
        assert outcomes.count("429") >= 1 and outcomes.count("ok") >= 2, outcomes
    finally:
        srv.close()


def test_client_disconnect_mid_stream_frees_the_slot(stories):
    srv = _start(stories, max_batch=1, max_queue=4)
    _slow_steps(srv, 0.01)
    try:
        body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "stream": True,
                           "temperature": 0}).encode()
        sock = socket.create_connection((srv.host, srv.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        sock.close()                   # hang up mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _get(srv.url + "/health")["running"]:
            time.sleep(0.05)
        assert _get(srv.url + "/health")["running"] == 0
        assert srv.service.engine.free_slots == [0]
        # The server keeps serving.
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0).choices[0].text
    finally:
        srv.close()


def test_lowbit_serve_generates_in_the_main_thread_and_stops_on_ctrl_c(tmp_path):
    """`lowbit serve` as a user runs it: a completion over HTTP equals the engine's greedy text, generation runs
    in the process's main thread (a second thread would make libgomp keep a second pool and sleep at
    barriers), and SIGINT ends the process with status 0."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import sys, threading; from lowbit.engine import server as S; run = S.Scheduler.run\n"
              "def traced(self):\n"
              "    print('scheduler in main thread:', threading.current_thread() is threading.main_thread(), "
              "file=sys.stderr, flush=True)\n"
              "    return run(self)\n"
              "S.Scheduler.run = traced\n"
              "from lowbit.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "serve", str(STORIES), "--port", str(port), "--threads", "1",
                             "--ctx", "128", "--model-name", MODEL], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180           # a loaded machine can take a minute to import and load
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                _get(url + "/v1/models")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        status, body = _post_raw(url + "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}).encode())
        assert status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "scheduler in main thread: True" in err, err[-2000:]
    from lowbit.models.loading import load_model

    assert body["choices"][0]["text"] == _greedy_text(load_model(STORIES), "Once upon a time", 16)


def test_a_burst_is_admitted_together_and_a_bad_request_fails_alone(stories):
    """The scheduler admits every waiting request that a slot can take with one prefill
    (Engine.start_many -> prefill_prompts); a request whose prompt does not fit the context gets its 400 alone;
    each admitted request's first token event carries the logits row its token was sampled from, that prompt's
    logits prefilled alone up to float32 rounding. A prefill that fails answers every request
    of its group with a 500, and the server keeps its slots."""
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    import torch

    from lowbit.engine.server import GenerationRequest, Scheduler

    model, tokenizer = stories
    engine = Engine(model, tokenizer, max_batch=4, context=32, threads=1)
    scheduler = Scheduler(engine, max_queue=8)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    prompts = [tokenizer(t).input_ids for t in ("Once upon a time", "Tom had a red ball", "The sun")]
    requests = [GenerationRequest(list(p), greedy, logprobs=True) for p in prompts]
    too_long = GenerationRequest([5] * 40, greedy)
    groups = []
    prefill_prompts = engine.decoder.prefill_prompts      # the tap's wrapper: the call the scheduler makes
    engine.decoder.prefill_prompts = lambda p, s: groups.append(len(p)) or prefill_prompts(p, s)
    for request in (requests[0], too_long, requests[1], requests[2]):
        scheduler.submit(request)
    scheduler._admit()
    assert groups == [3]
    kind, error = too_long.events.get_nowait()
    assert kind == "error" and error.status == 400 and "context" in str(error)
    for request, prompt in zip(requests, prompts):
        kind, (token, row) = request.events.get_nowait()
        alone = Engine(model, tokenizer, context=32, threads=1).decoder.prefill_prompts([torch.tensor(prompt)], [0])
        assert kind == "token" and token == int(alone[0].argmax())
        # float32 weights: a batch of 8+ rows takes the many-row float kernels, whose sums run in another order than
        # a lone row's (float32 rounding of dot products of <= 512 terms through 5 layers: 1e-4 of the range)
        assert (row - alone[0]).abs().max() <= 1e-4 * (alone[0].max() - alone[0].min())
    for request in requests:
        engine.release(request.sequence)
    scheduler.running.clear()

    def fail(p, s):
        raise RuntimeError("out of memory")

    engine.decoder.prefill_prompts = fail
    burst = [GenerationRequest(list(p), greedy) for p in prompts[:2]]
    for request in burst:
        scheduler.submit(request)
    scheduler._admit()
    for request in burst:
        kind, error = request.events.get_nowait()
        assert kind == "error" and error.status == 500 and "out of memory" in str(error)
    assert engine.free_slots == [0, 1, 2, 3] and not scheduler.running
