#!/usr/bin/env bash
# Stop the local cluster that start-local.sh started, and nothing else.
#
#   bash cluster/stop-local.sh               # RAY_TMPDIR=... if start-local.sh was given one
#
# `ray stop` would stop every Ray process on this host (other clusters, a test suite's cluster,
# other users' sessions). Instead this stops the processes that carry
# SPECMOE_LOCAL_RAY_CLUSTER=$RAY_TMPDIR in their environment (start-local.sh sets it; the GCS,
# raylets, dashboard, agents, client server and every Ray worker inherit it) or name $RAY_TMPDIR
# on their command line, plus their descendants: SIGTERM, a grace period, then SIGKILL.
# Reading another process's environment needs the same user (or root): run it as the user
# who started the cluster.
set -euo pipefail

RAY_TMPDIR="${RAY_TMPDIR:-/tmp/specmoe-local-ray}"
GRACE_S="${GRACE_S:-10}"
DRY_RUN="${DRY_RUN:-0}"                  # DRY_RUN=1: list the processes, stop nothing
if [ -d "$RAY_TMPDIR" ]; then
  RAY_TMPDIR="$(cd "$RAY_TMPDIR" && pwd -P)"
fi

python - "$RAY_TMPDIR" "$GRACE_S" "$DRY_RUN" <<'PY'
import os
import sys

try:
    import psutil
except ImportError:  # Ray ships its own copy and puts it on sys.path when imported
    import ray  # noqa: F401
    import psutil

tmpdir, grace_s, dry_run = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
me = os.getpid()
marker = f"SPECMOE_LOCAL_RAY_CLUSTER={tmpdir}"


def ours(p: psutil.Process) -> bool:
    try:
        if p.environ().get("SPECMOE_LOCAL_RAY_CLUSTER") == tmpdir:
            return True
        args = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # The directory itself (a path below it, or an argument equal to it), not a longer name.
    return any(a == tmpdir or a.endswith(f"={tmpdir}") or f"{tmpdir}/" in a for a in args)


procs = {}
for p in psutil.process_iter():
    if p.pid == me or p.pid in procs or not ours(p):
        continue
    procs[p.pid] = p
    try:
        procs.update({c.pid: c for c in p.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
procs.pop(me, None)
if not procs:
    print(f"no process of the local cluster in {tmpdir} is running ({marker})")
    sys.exit(0)
if dry_run:
    for p in procs.values():
        try:
            print(p.pid, " ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    sys.exit(0)
print(f"stopping {len(procs)} processes of the local cluster in {tmpdir}")
for p in procs.values():
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(alive, timeout=5)
if alive:
    sys.exit(f"could not stop processes {[p.pid for p in alive]}")
PY
if [ "$DRY_RUN" = "1" ]; then
  exit 0
fi
rm -f "$RAY_TMPDIR/specmoe-local.env"
echo "stopped; logs stay in $RAY_TMPDIR (remove it when done)"
