#!/usr/bin/env bash
# Start a local multi-node Ray cluster on this machine: one head node plus N worker nodes,
# each a real raylet with its own ports and its own custom resource, so placement across
# "nodes" (shards pinned with shards.bundle_resources, SPREAD placement groups) can be
# tried on one host.
#
#   bash cluster/start-local.sh [N]          # N worker nodes (default 2)
#   eval "$(bash cluster/start-local.sh 2 | grep '^export ')"   # start and export the addresses
#   bash cluster/stop-local.sh               # stops this cluster only
#
# Nodes and resources:
#   head      node_0: 1, head: 1   (GCS, dashboard, Serve controller; also runs work)
#   worker i  node_i: 1            (i = 1..N)
# Ports (override with the environment variables below; Ray binds the GCS and raylet ports on all
# interfaces, the dashboard on $DASHBOARD_HOST only):
#   GCS                 $GCS_PORT (6390)          Ray client server  $GCS_PORT+1
#   dashboard / jobs    $DASHBOARD_PORT (8266)    on $DASHBOARD_HOST (127.0.0.1)
#   node i (0 = head)   $GCS_PORT+10+10*i .. +5: node manager, object manager, dashboard agent
#                       (HTTP, gRPC), runtime-env agent, metrics; Ray workers use
#                       $WORKER_PORT_BASE+1000*i .. +999
# The ports are not Ray's defaults (6379, 8265, 52365, 10001...), so this cluster can run beside
# another one (a test cluster, say). Serve's HTTP port comes from the Serve config you deploy
# (deployments/demo.yaml: 127.0.0.1:8000, head node only).
#
# All state lives under $RAY_TMPDIR (default /tmp/specmoe-local-ray): sessions, logs, sockets.
# Every process of the cluster carries SPECMOE_LOCAL_RAY_CLUSTER=$RAY_TMPDIR in its environment;
# stop-local.sh finds this cluster's processes by it and stops only them.
set -euo pipefail

N="${1:-2}"
if ! [[ "$N" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 [NUM_WORKER_NODES]" >&2
  exit 2
fi
GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8266}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
NODE_IP="${NODE_IP:-127.0.0.1}"
NUM_CPUS="${NUM_CPUS:-1}"                 # logical CPUs per node: keep small on a 2-core machine
WORKER_PORT_BASE="${WORKER_PORT_BASE:-21000}"
RAY_TMPDIR="${RAY_TMPDIR:-/tmp/specmoe-local-ray}"
RAY="${RAY:-ray}"

if [ -e "$RAY_TMPDIR/specmoe-local.env" ]; then
  echo "a local cluster from $RAY_TMPDIR seems to be running already; run cluster/stop-local.sh first" >&2
  exit 1
fi

port_busy() {
  python - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(0)  # busy
finally:
    s.close()
sys.exit(1)
EOF
}
for p in "$GCS_PORT" "$((GCS_PORT + 1))" "$DASHBOARD_PORT"; do
  if port_busy "$NODE_IP" "$p"; then
    echo "port $p is in use; choose others, e.g. GCS_PORT=6490 DASHBOARD_PORT=8366 $0 $N" >&2
    exit 1
  fi
done

node_ports() {  # ports of node $1 (0 = head)
  local b=$((GCS_PORT + 10 + 10 * $1)) w=$((WORKER_PORT_BASE + 1000 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1))" \
    "--dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3))" \
    "--runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5))" \
    "--min-worker-port=$w --max-worker-port=$((w + 999))"
}

mkdir -p "$RAY_TMPDIR"
RAY_TMPDIR="$(cd "$RAY_TMPDIR" && pwd -P)"
export RAY_USAGE_STATS_ENABLED=0
# Every process of this cluster inherits this variable (Ray's workers too): stop-local.sh uses
# it to find them, and only them.
export SPECMOE_LOCAL_RAY_CLUSTER="$RAY_TMPDIR"
# With ~/.ray/auth_token present (or RAY_AUTH_MODE=token), `ray start` turns Ray token auth on;
# every node and every dashboard client then needs RAY_AUTH_MODE=token (they read the same file).
AUTH=""
if [ "${RAY_AUTH_MODE:-}" = "token" ] || [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  export RAY_AUTH_MODE=token
  AUTH=token
fi

echo "starting head node (node_0) with GCS on $NODE_IP:$GCS_PORT, dashboard on $DASHBOARD_HOST:$DASHBOARD_PORT"
# shellcheck disable=SC2046
"$RAY" start --head \
  --node-ip-address="$NODE_IP" --port="$GCS_PORT" --ray-client-server-port=$((GCS_PORT + 1)) \
  --include-dashboard=true --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" \
  --num-cpus="$NUM_CPUS" --num-gpus=0 --resources='{"node_0": 1, "head": 1}' \
  --temp-dir="$RAY_TMPDIR" --disable-usage-stats $(node_ports 0) >"$RAY_TMPDIR/start-node_0.log" 2>&1 \
  || { cat "$RAY_TMPDIR/start-node_0.log" >&2; exit 1; }
# The marker stop-local.sh looks for; written as soon as anything may be running.
echo "RAY_TMPDIR=$RAY_TMPDIR GCS_PORT=$GCS_PORT DASHBOARD_PORT=$DASHBOARD_PORT N=$N" >"$RAY_TMPDIR/specmoe-local.env"

for i in $(seq 1 "$N"); do
  echo "starting worker node node_$i"
  # shellcheck disable=SC2046
  "$RAY" start --address="$NODE_IP:$GCS_PORT" --node-ip-address="$NODE_IP" \
    --num-cpus="$NUM_CPUS" --num-gpus=0 --resources="{\"node_$i\": 1}" \
    --disable-usage-stats $(node_ports "$i") >"$RAY_TMPDIR/start-node_$i.log" 2>&1 \
    || { cat "$RAY_TMPDIR/start-node_$i.log" >&2; echo "run cluster/stop-local.sh to clean up" >&2; exit 1; }
done

# Wait until `ray status` lists every node as active (its view, published by the autoscaler's
# monitor every few seconds, lags the GCS's).
deadline=$((SECONDS + 90))
while :; do
  active=$( ("$RAY" status --address="$NODE_IP:$GCS_PORT" 2>/dev/null || true) \
    | awk '/^Active:/ {a = 1; next} /^(Idle|Pending):/ {a = 0} a && /node_/ {n++} END {print n + 0}')
  if [ "$active" -ge $((N + 1)) ]; then
    break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "only $active of $((N + 1)) nodes are active after 90 s; see $RAY_TMPDIR/session_latest/logs" >&2
    exit 1
  fi
  sleep 1
done

SESSION="$(readlink -f "$RAY_TMPDIR/session_latest")"
cat <<EOF

local Ray cluster up: head + $N worker node(s), custom resources node_0..node_$N
session dir: $SESSION (logs in logs/)

export these to use it (ray status, ray.init(), specmoe serve; serve deploy/status, ray job):
export RAY_ADDRESS=$NODE_IP:$GCS_PORT
export RAY_DASHBOARD_ADDRESS=http://$DASHBOARD_HOST:$DASHBOARD_PORT
EOF
if [ -n "$AUTH" ]; then
  echo "export RAY_AUTH_MODE=token"
fi
cat <<EOF

then:  ray status
       serve deploy deployments/demo.yaml && serve status
       ray job submit --address http://$DASHBOARD_HOST:$DASHBOARD_PORT -- python -c 'import ray; ray.init(); print(ray.cluster_resources())'
stop:  bash cluster/stop-local.sh
EOF
