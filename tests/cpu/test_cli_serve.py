"""`specmoe serve` as a user runs it: a subprocess, the OpenAI client, Ctrl-C, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(session: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if session in line]


def test_specmoe_serve_end_to_end(tmp_path):
    import openai

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 (the subprocess writes it)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmoe_ray.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    session = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            text = (tmp_path / "serve.log").read_text()
            session = session or (m.group(1) if (m := re.search(r"Ray session: (\S+)", text)) else None)
            if "ready in" in text:
                break
            time.sleep(1)
        else:
            pytest.fail("specmoe serve did not become ready:\n" + (tmp_path / "serve.log").read_text())
        assert "Ctrl-C stops the server" in text and f"http://127.0.0.1:{port}/v1" in text
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).status == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        out = client.completions.create(
            model="specmoe-demo", prompt="def main():", max_tokens=16, temperature=0
        )
        assert out.usage.completion_tokens == 16 and out.choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = proc.wait(timeout=120)
    text = (tmp_path / "serve.log").read_text()
    assert code == 0, text[-3000:]
    assert "shutting down" in text
    assert session
    deadline = time.time() + 30
    while ray_processes(session) and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes(session), ray_processes(session)
