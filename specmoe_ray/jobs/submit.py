"""`specmoe submit`: run a command on a Ray cluster as a Ray Job, through the dashboard's job API.

    specmoe submit [--address http://HEAD:8265] [--working-dir DIR] [--runtime-env-json JSON] \\
        -- specmoe batch prompts.jsonl /shared/out.jsonl --config deployments/demo.yaml

The job's logs stream to this terminal; the exit status is the job's: 0 when it SUCCEEDED, 1 when
it FAILED or was STOPPED. Ctrl-C (or SIGTERM) stops the job and exits 130. `--no-wait` prints the
job id and returns at once. One ENTRYPOINT argument is a shell command line as is; several are
quoted and joined.

Token authentication (Ray 2.60): when the cluster has a token (`~/.ray/auth_token`, or
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `--token-file`), it is sent as a bearer token and
`RAY_AUTH_MODE=token` is set for the client. `RAY_AUTH_MODE=disabled` sends none (unless
`--token-file` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from typing import Any

DEFAULT_TOKEN_PATH = os.path.join("~", ".ray", "auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """Cannot reach the cluster, authenticate, or submit; the message says what to do."""


def find_token(token_file: str | None = None, env: dict[str, str] | None = None) -> str | None:
    """The cluster's auth token: --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if token_file is not None:
        path = os.path.expanduser(token_file)
        if not os.path.isfile(path):
            raise SubmitError(f"token file not found: {token_file}")
        return _read_token(path)
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = os.path.expanduser(env["RAY_AUTH_TOKEN_PATH"])
        if not os.path.isfile(path):
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']}: no such file")
        return _read_token(path)
    home = env.get("HOME") or os.path.expanduser("~")
    path = os.path.join(home, ".ray", "auth_token")
    return _read_token(path) if os.path.isfile(path) else None


def _read_token(path: str) -> str:
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise SubmitError(f"token file {path} is empty")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None = None, token_file: str | None = None, set_env: bool = False):
    """A JobSubmissionClient for the cluster, with its token when it has one; SubmitError if not."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = find_token(token_file)
    if token and set_env:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if address and "://" not in address:
        address = f"http://{address}"
    where = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "the default"
    )
    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "authentication failed"
        hint = (
            "the token sent was not accepted: use the cluster's token (--token-file, RAY_AUTH_TOKEN, "
            "or ~/.ray/auth_token from the head node)"
            if token
            else "the cluster uses token authentication: copy its token to ~/.ray/auth_token, or pass "
            "--token-file / set RAY_AUTH_TOKEN"
        )
        raise SubmitError(f"authentication failed at {where}: {first}\n  {hint}") from None
    except ConnectionError as e:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {where} ({e}); is the cluster running with its "
            "dashboard (`ray start --head`, ray[default]), and is --address its dashboard URL "
            "(http://HEAD:8265)?"
        ) from None
    except RuntimeError as e:  # e.g. an HTTP server that is not a Ray dashboard
        raise SubmitError(f"{where}: {e}") from None


def build_runtime_env(ns: argparse.Namespace) -> dict[str, Any] | None:
    env: dict[str, Any] = {}
    if ns.runtime_env:
        import yaml

        with open(ns.runtime_env) as f:
            env.update(yaml.safe_load(f) or {})
    if ns.runtime_env_json:
        try:
            data = json.loads(ns.runtime_env_json)
        except json.JSONDecodeError as e:
            raise SubmitError(f"--runtime-env-json: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise SubmitError("--runtime-env-json: must be a JSON object")
        env.update(data)
    if ns.working_dir:
        if "://" not in ns.working_dir and not os.path.isdir(ns.working_dir):
            raise SubmitError(f"--working-dir: no such directory: {ns.working_dir}")
        env["working_dir"] = ns.working_dir
    return env or None


def entrypoint_of(args: list[str]) -> str:
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SubmitError("no entrypoint: give the command after --, e.g. `specmoe submit -- python run.py`")
    return args[0] if len(args) == 1 else shlex.join(args)


async def _follow(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_terminal(client, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def _stop(client, job_id: str) -> str:
    print(f"\nspecmoe submit: stopping job {job_id}", file=sys.stderr, flush=True)
    try:
        client.stop_job(job_id)
        return wait_for_terminal(client, job_id, timeout_s=30)
    except Exception as e:  # report, still exit 130
        print(f"specmoe submit: could not stop job {job_id}: {e}", file=sys.stderr)
        return "UNKNOWN"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "submit",
        help="run a command (e.g. `specmoe batch ...`) on a Ray cluster as a Ray Job; stream its logs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)",
    )
    p.add_argument("--working-dir", default=None, help="local directory uploaded as the job's working dir")
    p.add_argument("--runtime-env", default=None, help="a runtime_env YAML file")
    p.add_argument("--runtime-env-json", default=None, help="runtime_env as JSON (merged over --runtime-env)")
    p.add_argument("--submission-id", default=None, help="the job's id (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the entrypoint")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the entrypoint")
    p.add_argument("--metadata-json", default=None, help="job metadata as a JSON object of strings")
    p.add_argument("--token-file", default=None, help="the cluster's auth token (default: ~/.ray/auth_token)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... (what the job runs)")
    p.set_defaults(func=main)
    return p


def _metadata(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SubmitError(f"--metadata-json: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SubmitError("--metadata-json: must be a JSON object of strings")
    return data


def main(ns: argparse.Namespace) -> int:
    import logging

    from ray.exceptions import AuthenticationError

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    try:
        entrypoint = entrypoint_of(ns.entrypoint)
        runtime_env = build_runtime_env(ns)
        metadata = _metadata(ns.metadata_json)
        client = connect(ns.address, ns.token_file, set_env=True)
        kwargs: dict[str, Any] = {}
        if ns.entrypoint_num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = ns.entrypoint_num_cpus
        if ns.entrypoint_num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = ns.entrypoint_num_gpus
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=ns.submission_id,
            metadata=metadata,
            **kwargs,
        )
    except (SubmitError, OSError, ValueError) as e:
        print(f"specmoe submit: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, AuthenticationError) as e:  # the job API refused it (e.g. a duplicate id)
        print(f"specmoe submit: the cluster refused the job: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    address = client.get_address()
    print(f"specmoe submit: job {job_id} submitted to {address}", file=sys.stderr, flush=True)
    if ns.no_wait:
        print(job_id)
        print(
            f"  logs: ray job logs -f {job_id} --address {address}\n"
            f"  stop: ray job stop {job_id} --address {address}",
            file=sys.stderr,
        )
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            asyncio.run(_follow(client, job_id, sys.stdout))
        except Exception as e:  # the log stream broke: wait for the status instead
            print(f"specmoe submit: log stream ended ({e}); waiting for the job", file=sys.stderr, flush=True)
        status = wait_for_terminal(client, job_id)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        status = _stop(client, job_id)
        print(f"specmoe submit: job {job_id} {status}", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if status == "SUCCEEDED":
        print(f"specmoe submit: job {job_id} SUCCEEDED", file=sys.stderr, flush=True)
        return 0
    message = ""
    try:
        info = client.get_job_info(job_id)
        message = (info.message or "").strip().splitlines()[0] if info.message else ""
        message = message.split(", last available logs")[0]  # the logs were streamed above
    except Exception:
        pass
    print(f"specmoe submit: job {job_id} {status}" + (f": {message}" if message else ""), file=sys.stderr)
    return 1
