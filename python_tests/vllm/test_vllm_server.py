"""The OpenAI-compatible server, started with the documented command, answers a completion with the tokens of
transformers MindSkip. It listens on 127.0.0.1 only; the test starts it and stops it (its whole process group)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import NEW_TOKENS

STARTUP_SECONDS = 600  # vLLM's engine processes each import vLLM: minutes on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, payload: dict | None = None, timeout: float = 120) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else {}


@pytest.fixture
def server(tiny, tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "mindskip_ext.vllm.serve", str(tiny.base), "--routers", str(tiny.routers),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "4",
    ]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below, after the server has stopped)
    # Its own process group and a folder without a mindskip_ext source tree (which would shadow the installed one).
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                output = (tmp_path / "server.log").read_text()[-4000:]
                pytest.fail(f"the server exited with {proc.returncode}:\n{output}")
            try:
                request(f"{url}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start in {STARTUP_SECONDS} s")
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_server_completion_matches_transformers(tiny, server):
    for ids, expected in list(zip(tiny.prompts, tiny.expected))[:3]:
        answer = request(
            f"{server}/v1/completions",
            {
                "model": str(tiny.base), "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True,
            },
        )
        assert answer["choices"][0]["token_ids"] == expected
