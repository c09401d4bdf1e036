"""Batch generation as a Ray Job: a real head with the dashboard, `JobSubmissionClient`, `specmoe submit`.

The head is this module's own (`ray start --head --block` with its own ports and temp dir), so
other Ray clusters on the machine are left alone; it is stopped by signalling that process.
Token authentication is on when the machine has `~/.ray/auth_token` (Ray 2.60's default) and
off otherwise: the tests pass either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

from specmoe_ray.jobs.batch import BatchFileError, Defaults, derive_seed, open_output, run_batch
from specmoe_ray.jobs.submit import SubmitError, connect, find_token

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_checkpoint, save_char_tokenizer  # noqa: E402

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(path) -> str:
    with open(path) as f:
        return f.read()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time, to spot a reused pid
    except OSError:
        return None


def process_tree(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of root and all its descendants."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for row in out.splitlines():
        pid, ppid = map(int, row.split())
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if (start := _start_time(pid)) is not None:
            tree.append((pid, start))
        todo.extend(children.get(pid, []))
    return tree


def job_env() -> dict[str, str]:
    """The environment of processes this test starts: no address of some other cluster."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


@dataclasses.dataclass
class Head:
    url: str
    temp_dir: str
    auth: bool  # token authentication on

    def client(self):
        return connect(self.url)


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="smj", dir="/tmp")  # short: Ray's socket paths live under it
    dash = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--port={free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--object-store-memory=100000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env(), start_new_session=True
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{text(log_path)[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=5)
                auth = False
                break
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    auth = True
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard did not come up:\n{text(log_path)[-3000:]}")
            time.sleep(0.5)
        yield Head(url, temp_dir, auth)
    finally:
        family = process_tree(proc.pid)  # this head's processes, its workers and their jobs
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 15
        while (alive := [p for p, t in family if _start_time(p) == t]) and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE with a character tokenizer (text and token-id prompts)."""
    path = str(tmp_path_factory.mktemp("jobs") / "target")
    make_checkpoint(path, "qwen3_moe", seed=11)
    save_char_tokenizer(path)
    return path


def wait_job(client, job_id: str, timeout_s: float = 150) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} still {status} after {timeout_s}s:\n{client.get_job_logs(job_id)[-3000:]}"
            )
        time.sleep(0.3)
    return status


def read_out(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def batch_cmd(inp: str, out: str, *options: str) -> str:
    return " ".join([sys.executable, "-m", "specmoe_ray.cli", "batch", inp, out, *options])


def expected_params(line: dict, max_tokens: int):
    from specmoe_ray import SamplingParams

    temperature = line.get("temperature", 0.0)
    seed = line.get("seed", derive_seed(0, line["id"]) if temperature else None)
    return SamplingParams(max_tokens=line.get("max_tokens", max_tokens), temperature=temperature, seed=seed)


def reference(model: str, lines: list[dict], max_tokens: int, **engine_kwargs) -> dict:
    """In-process `Engine.generate` for the same lines: id -> output."""
    from specmoe_ray import Engine

    with Engine.from_pretrained(model, **engine_kwargs) as engine:
        outs = engine.generate([x["prompt"] for x in lines], [expected_params(x, max_tokens) for x in lines])
    return {x["id"]: o for x, o in zip(lines, outs)}


def assert_matches(results: list[dict], ref: dict) -> None:
    assert sorted(json.dumps(r["id"]) for r in results) == sorted(json.dumps(k) for k in ref)
    for r in results:
        o = ref[r["id"]]
        assert r["token_ids"] == o.token_ids, r["id"]
        assert r["text"] == o.text, r["id"]
        assert r["finish_reason"] == o.finish_reason
        assert r["prompt_tokens"] == len(o.prompt_token_ids)
        assert r["completion_tokens"] == len(o.token_ids)


def test_batch_job_matches_in_process(ray_head, model_dir, tmp_path):
    wd = tmp_path / "wd"  # the job's working_dir: IN.jsonl travels with it
    wd.mkdir()
    lines = []
    for i in range(12):
        if i % 2:
            line = {"id": f"t{i}", "prompt": "def f(x):\n    return x" + "+1" * i}
        else:
            line = {"id": i, "prompt": [5 + i, 9, 17, 3, 40 + i]}
        lines.append(line)
    lines[3]["max_tokens"] = 5
    lines[4].update(temperature=0.8, seed=1234)  # sampled, seeded
    lines[7]["temperature"] = 0.9  # sampled, seed derived from the id
    raw = [json.dumps(x) for x in lines]
    raw.insert(3, '{"id": "broken", "prompt": ')  # line 4
    raw.insert(8, json.dumps({"prompt": "no id"}))  # line 9
    (wd / "IN.jsonl").write_text("\n".join(raw) + "\n")
    # The engine a deployment config describes (build_engine), its experts on a shard actor
    # that the job starts on the cluster.
    config = {
        "model": {"target": model_dir, "draft": "ngram"},
        "engine": {"max_num_seqs": 4, "num_speculative_tokens": 3},
        "shards": {"num_shards": 1, "num_cpus": 0.5},
    }
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "OUT.jsonl"

    client = ray_head.client()
    job = client.submit_job(
        entrypoint=batch_cmd("IN.jsonl", str(out), "--config", "config.yaml", "--max-tokens", "12"),
        runtime_env={"working_dir": str(wd), "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    status = wait_job(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "IN.jsonl:4: not valid JSON" in logs, logs
    assert "IN.jsonl:9: id: Field required" in logs, logs
    assert "12 done, 0 already in" in logs and "2 bad lines skipped" in logs, logs

    results = read_out(out)
    assert len(results) == 12
    assert {r["id"] for r in results if "seed" in r} == {4, "t7"}
    assert all(r["acceptance_rate"] is not None for r in results)  # the n-gram draft proposed tokens
    ref = reference(model_dir, lines, 12, draft="ngram", num_speculative_tokens=3)
    assert_matches(results, ref)


def pids_running(*needles: str) -> list[int]:
    """Processes whose command line holds every needle."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            pids.append(int(entry))
    return pids


def sigterm_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    mask = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_stopped_job_resumes_each_id_once(ray_head, model_dir, tmp_path):
    n = 16
    lines = [{"id": f"r{i}", "prompt": [(7 * i) % 90 + 1, 4, 30 + i]} for i in range(n)]
    inp, out = tmp_path / "IN.jsonl", tmp_path / "OUT.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = batch_cmd(str(inp), str(out), "--model", model_dir, "--max-tokens", "32", "--batch-size", "2")
    client = ray_head.client()

    first = client.submit_job(entrypoint=cmd)
    # Midway: once some results are in OUT, freeze the job's processes so that the stop lands
    # at a known point whatever this machine's speed, then stop the job the ordinary way.
    deadline = time.monotonic() + 120
    while not (frozen := pids_running("specmoe_ray.cli", str(out))):  # the job's processes
        if str(client.get_job_status(first).value) in TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"the job did not start:\n{client.get_job_logs(first)[-3000:]}")
        time.sleep(0.05)
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        if not all(os.path.exists(f"/proc/{pid}") for pid in frozen) or time.monotonic() > deadline:
            pytest.fail(f"no results while the job ran:\n{client.get_job_logs(first)[-3000:]}")
        time.sleep(0.002)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    at_stop = out.read_bytes().count(b"\n")
    try:
        client.stop_job(first)  # Ray sends SIGTERM to the job's processes
        deadline = time.monotonic() + 30
        while not all(sigterm_pending(pid) for pid in frozen) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert wait_job(client, first) == "STOPPED"
    logs = client.get_job_logs(first)
    assert "stopped by SIGTERM" in logs, logs[-3000:]  # finished its step, wrote it, and exited
    done_first = read_out(out)  # every line whole: each result was written and synced at once
    assert at_stop <= len(done_first) <= at_stop + 2 < n

    second = client.submit_job(entrypoint=cmd)
    status = wait_job(client, second)
    logs = client.get_job_logs(second)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"{n - len(done_first)} done, {len(done_first)} already in" in logs, logs
    results = read_out(out)
    assert len(results) == n and len({r["id"] for r in results}) == n
    assert results[: len(done_first)] == done_first
    assert_matches(results, reference(model_dir, lines, 32))


def test_resume_after_torn_last_line(model_dir, tmp_path):
    from specmoe_ray import Engine

    lines = [{"id": f"k{i}", "prompt": [3 + i, 50, 8]} for i in range(4)]
    inp = tmp_path / "IN.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    engine = Engine.from_pretrained(model_dir, max_num_seqs=4)
    defaults = Defaults(max_tokens=6)
    full = tmp_path / "full.jsonl"
    s = run_batch(str(inp), str(full), engine, defaults=defaults, progress=False)
    assert (s.done, s.bad, s.already_done) == (4, 0, 0)
    whole = full.read_bytes().splitlines(keepends=True)

    # A crash while appending the third result: two whole lines and part of one.
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(whole[0] + whole[1] + whole[2][:25])
    log = []

    class Stream:
        def write(self, s):
            log.append(s)

        def flush(self):
            pass

    s = run_batch(str(inp), str(torn), engine, defaults=defaults, progress=False, stream=Stream())
    assert (s.done, s.already_done) == (2, 2)
    assert "torn.jsonl:3: incomplete last line" in "".join(log)
    got = sorted(read_out(torn), key=lambda r: r["id"])
    assert got == sorted(read_out(full), key=lambda r: r["id"])

    # Nothing left to do: the engine is not even built.
    def no_engine():
        raise AssertionError("built an engine with nothing to do")

    s = run_batch(str(inp), str(torn), no_engine, defaults=defaults, progress=False, stream=Stream())
    assert (s.done, s.already_done) == (0, 4)

    # A complete line that is not a result: refuse to append rather than guess.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(whole[0].decode() + "hello\n")
    with pytest.raises(BatchFileError, match=r"bad.jsonl:2: not a result line"):
        run_batch(str(inp), str(bad), no_engine, progress=False, stream=Stream())

    # OUT held by another run: wait, then a clear error.
    f, _ = open_output(str(full), print)
    try:
        with pytest.raises(BatchFileError, match="locked by another run"):
            run_batch(str(inp), str(full), no_engine, progress=False, lock_timeout_s=0.3, stream=Stream())
    finally:
        f.close()


def test_batch_cli_usage_errors(tmp_path, capsys):
    from specmoe_ray.cli import main

    assert main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--draft", "ngram"]) == 2
    assert "go with --model" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out"), "--model", "x"]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert main(["batch", "in", "out", "--model", "x", "--top-p", "2"]) == 2
    assert "bad default: top_p" in capsys.readouterr().err


def _submit(head: Head, tmp_path, name: str, *args: str, env=None) -> tuple[subprocess.Popen, str, str]:
    out, err = str(tmp_path / f"{name}.out"), str(tmp_path / f"{name}.err")
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "specmoe_ray.cli", "submit", "--address", head.url, *args],
            stdout=o,
            stderr=e,
            env=env or job_env(),
        )
    return proc, out, err


def test_specmoe_submit_exit_codes(ray_head, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "hello.py").write_text("import os\nprint(os.environ['GREETING'], 6 * 7)\n")
    py = sys.executable
    ok = _submit(
        ray_head, tmp_path, "ok", "--working-dir", str(wd), "--runtime-env-json",
        '{"env_vars": {"GREETING": "hello"}}', "--", py, "hello.py",
    )  # fmt: skip
    fail = _submit(ray_head, tmp_path, "fail", "--", f"{py} -c 'import sys; print(\"failing\"); sys.exit(3)'")
    sleeper = _submit(
        ray_head,
        tmp_path,
        "int",
        "--",
        py,
        "-c",
        "import time; print('started', flush=True); time.sleep(120)",
    )

    deadline = time.monotonic() + 90
    while "started" not in text(sleeper[1]):
        assert sleeper[0].poll() is None and time.monotonic() < deadline, text(sleeper[2])
        time.sleep(0.2)
    sleeper[0].send_signal(signal.SIGINT)  # Ctrl-C: stop the job, exit 130

    for proc, _, _ in (ok, fail, sleeper):
        proc.wait(timeout=120)
    assert ok[0].returncode == 0, text(ok[2])
    assert "hello 42" in text(ok[1])
    assert "SUCCEEDED" in text(ok[2])
    assert fail[0].returncode == 1, text(fail[2])
    assert "failing" in text(fail[1]) and "FAILED" in text(fail[2])
    assert sleeper[0].returncode == 130, text(sleeper[2])
    err = text(sleeper[2])
    job_id = err.split("specmoe submit: job ")[1].split()[0]
    assert str(ray_head.client().get_job_status(job_id).value) == "STOPPED", err

    # Without any entrypoint, and against a dead address: clear errors, exit 2.
    bad = _submit(ray_head, tmp_path, "noentry")
    assert bad[0].wait(timeout=60) == 2 and "no entrypoint" in text(bad[2])


def test_submit_token_auth(ray_head, tmp_path, monkeypatch):
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SubmitError, match="cannot reach the Ray dashboard"):
        connect(f"http://127.0.0.1:{free_port()}")

    # The machine's own token (if any) is found and used.
    assert ray_head.client().get_version()

    # No token file (another HOME): refused with a clear message when the cluster needs one.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert find_token() is None
    if ray_head.auth:
        with pytest.raises(SubmitError, match="uses token authentication"):
            connect(ray_head.url)
    else:
        connect(ray_head.url)

    # A wrong token.
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token\n")
    if ray_head.auth:
        with pytest.raises(SubmitError, match="was not accepted"):
            connect(ray_head.url, token_file=str(wrong))
    else:
        connect(ray_head.url, token_file=str(wrong))

    # Where tokens come from: the file under HOME, RAY_AUTH_TOKEN, and RAY_AUTH_MODE=disabled sends none.
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("from-file\n")
    assert find_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    assert find_token(str(wrong)) == "not-the-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert find_token() is None
    with pytest.raises(SubmitError, match="token file not found"):
        find_token(str(tmp_path / "nope"))
