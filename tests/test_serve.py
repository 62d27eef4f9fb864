"""`blt serve`: a real uvicorn server on 127.0.0.1 and a real HTTP client. Concurrent requests (greedy,
sampled, a list of prompts, a stream) share the live batch and get exactly `api.generate`'s text; bad requests
get a 400 with an OpenAI-style JSON error while the server keeps serving.

The default test serves in this process with the shapes tests/test_bulk.py compiles (batch 3, 64 positions),
so it adds little compile time; the slow one starts `blt serve` as a user would."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from blt_jax import serve
from blt_jax.cli import main
from blt_jax.generation import api
from test_bulk import BATCH, POSITIONS, expected, random_model, save_run

GOOD = [  # request body, the records (one per prompt) api.generate reproduces
    {"prompt": "def f(x):", "max_tokens": 20, "seed": 4, "frequency_penalty": 0},  # "off": accepted
    {"prompt": "import os", "max_tokens": 16, "temperature": 0.9, "top_p": 0.8, "seed": 11},
    {"prompt": ["ab", "class A:\n"], "max_tokens": 12},
]
STREAM = {"prompt": "hello (", "max_tokens": 24, "temperature": 0.7, "top_k": 20, "seed": 2, "stream": True}
BAD = [  # raw body, what the error message says
    ("{}", "prompt: missing"),
    ('{"prompt": "x", "max_tokens": -3}', "max_tokens: must be an integer >= 1"),
    ('{"prompt": "x", "temperature": NaN}', "temperature: must be a finite number"),
    ('{"prompt": "x", "temperature": 1e39}', "temperature: must be a finite number"),  # inf in float32
    ('{"prompt": "x", "temprature": 0.9}', "temprature: not a field; did you mean temperature?"),
    ('{"prompt": "x", "max_token": 5}', "max_token: not a field; did you mean max_tokens?"),
    ('{"prompt": "x", "top-p": 0.5}', "top-p: not a field; did you mean top_p?"),
    ('{"prompt": "x", "method": "d"}', "needs a model trained with the diffusion objective"),
    ('{"prompt": "' + "y" * 60 + '", "max_tokens": 8}', "more than the 64 this run holds per row"),
    ('{"prompt": "x", "stop": ["\\n"]}', "stop: not supported"),
    ('{"prompt": "x", "presence_penalty": 0.5}', "presence_penalty: not supported"),  # used to be ignored
    ("{bad", "not valid JSON"),
]


def records(body: dict) -> list[dict]:
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    return [{"prompt": p, "max_new_bytes": body["max_tokens"],
             **{k: body[k] for k in ("temperature", "top_p", "top_k", "seed") if k in body}} for p in prompts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the model, the server's URL, the Server): a plain random BLT served from a run directory."""
    model = random_model()
    run = save_run(model, tmp_path_factory.mktemp("serve") / "run")
    server = serve.Server(api.load(run), serve.ServerConfig(batch_size=BATCH, max_positions=POSITIONS))
    server.warm_up()
    port = free_port()
    http = serve.http_server(server, "127.0.0.1", port)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield model, f"http://127.0.0.1:{port}", server
    http.should_exit = True
    thread.join()
    server.stop()


async def _stream(client: httpx.AsyncClient, body: dict) -> list[dict]:
    events = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_concurrent_requests_share_the_batch_and_equal_api_generate(served):
    model, url, _ = served

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            posts = [client.post("/v1/completions", json=b) for b in GOOD]
            bad = [client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                   for raw, _ in BAD]
            answers = await asyncio.gather(_stream(client, STREAM), *posts, *bad)
            again = await client.post("/v1/completions", json=GOOD[0])
            health = (await client.get("/health")).json()
            return answers[0], answers[1:1 + len(GOOD)], answers[1 + len(GOOD):], again, health

    chunks, answers, refused, again, health = asyncio.run(run())
    for body, answer in zip(GOOD, answers, strict=True):
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["object"] == "text_completion" and len(data["choices"]) == len(records(body))
        for choice, rec in zip(data["choices"], records(body), strict=True):
            want = expected(model, rec)
            assert choice["text"] == want.text, rec
            assert choice["finish_reason"] == ("stop" if want.token_ids[-1:] == [2] else "length")
        assert data["usage"]["completion_tokens"] == sum(len(expected(model, r).new_bytes) for r in records(body))
    want = expected(model, records(STREAM)[0])
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert len(chunks) >= 2 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    for (_, message), answer in zip(BAD, refused, strict=True):
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
    assert again.status_code == 200 and again.json()["choices"] == answers[0].json()["choices"]
    assert health["engines"]["ar"]["peak_rows"] >= 2  # clients' rows ran in one batch


def test_serve_refuses_a_taken_port_before_loading_anything(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["serve", "--checkpoint", str(tmp_path / "no-run"), "--port", str(taken.getsockname()[1])]) == 2
    assert "address already in use" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_refuses_a_port_out_of_range_in_one_line(tmp_path, capsys, port):
    """A probe: --port 70000 ended in socket's OverflowError traceback."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(tmp_path / "no-run"), "--port", port])
    assert e.value.code == 2 and "must be a TCP port in 0-65535" in capsys.readouterr().err


def test_serve_refuses_a_default_budget_no_request_could_use(tmp_path, capsys):
    """A probe: --max-positions 64 --max-new-bytes 1000 started a server that answered every request without
    max_tokens with a 400."""
    run = save_run(random_model(), tmp_path / "run")
    args = ["serve", "--checkpoint", run, "--port", "0", "--max-positions", "64", "--no-warmup"]
    assert main(args + ["--max-new-bytes", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-bytes 1000" in err and "needs 1003 positions" in err and "--max-positions 64" in err


def test_serve_refuses_a_block_larger_than_the_model_was_trained_with(tmp_path, capsys, monkeypatch):
    """A probe: `blt serve --block-size 16` of a BLT-D-8 run started, and every `d` request would have drafted
    cells the model was never trained to predict (the default method `ar` does not read the option)."""
    monkeypatch.setattr(serve, "serve", lambda *a, **k: pytest.fail("the server started"))
    run = save_run(random_model(block_size=4), tmp_path / "run")
    assert main(["serve", "--checkpoint", run, "--port", "0", "--no-warmup", "--block-size", "8"]) == 2
    assert "block_size: 8 is larger than the blocks of 4 this model was trained with" in capsys.readouterr().err


def test_serve_on_port_0_reports_the_port_it_serves(tmp_path):
    """A probe: `--port 0` printed http://127.0.0.1:0/..., and the port the OS chose was never shown."""
    run = save_run(random_model(), tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "blt_jax", "serve", "--checkpoint", run, "--port", "0",
                             "--no-warmup"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = ""
        while "http://" not in line:
            line = proc.stderr.readline()
            assert line, "the server ended before it listened"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1/completions", line).group(1))
        assert port > 0 and httpx.get(f"http://127.0.0.1:{port}/health", timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_blt_serve_command_answers_and_stops_on_sigterm(tmp_path):
    """`blt serve` in its own process, as a user starts it: it answers once warm, SIGTERM stops it (status 0)."""
    model = random_model()
    run = save_run(model, tmp_path / "run")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blt_jax", "serve", "--checkpoint", run, "--port", str(port),
                             "--batch-size", "2", "--max-positions", "96", "--max-new-bytes", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "def g(", "seed": 1},
                            timeout=300).json()
        assert answer["choices"][0]["text"] == api.generate(model, ["def g("], max_new_bytes=10)[0].text
        assert answer["model"] == "run"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
