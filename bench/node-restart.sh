#!/usr/bin/env bash
# Node restart under running VMs: one `tern node` with a datastore runs $VMS VMs (each its own
# `tern vmm` process, self-verifying test guest); the node is killed with SIGKILL and started
# again, $RUNS times. Per restart it prints the time until the restarted node reports every VM
# again (all in /v1/local as running, each guest's status answering with pages written since
# the kill) and the largest guest stall (the guests' own max_stall over their whole life, so a
# figure that includes boot and every earlier restart) before and after.
# Usage: bench/node-restart.sh [path/to/tern]   env: VMS MEM WORKLOAD WARMUP RUNS
set -euo pipefail
TERN=${1:-target/release/tern}
VMS=${VMS:-8}
MEM=${MEM:-128M}
WORKLOAD=${WORKLOAD:-wss=32M,rate=2000,pattern=random,duty=20}
WARMUP=${WARMUP:-10}
RUNS=${RUNS:-5}
dir=$(mktemp -d)
net="127.$((RANDOM % 200 + 20)).$((RANDOM % 200 + 20))"
addr=$net.1:7400
node_pid=
# The VMMs this node started, each checked against its command line (never a reused pid).
vmm_pids() {
  for f in "$dir"/n1/run/vms/*/pid; do
    [ -f "$f" ] || continue
    local p; p=$(cat "$f")
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "$(dirname "$f")" && echo "$p"
  done
  return 0
}
cleanup() {
  [ -n "$node_pid" ] && kill -9 "$node_pid" 2>/dev/null || true
  for p in $(vmm_pids); do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
start_node() {
  local join=(--bootstrap)
  [ -d "$dir/n1" ] && join=()
  "$TERN" node --id 1 --listen "$addr" --data "$dir/n1" --datastore "$dir/ds" \
    "${join[@]}" >/dev/null 2>>"$dir/n1.log" &
  node_pid=$!
  disown "$node_pid"
}
# Largest max_stall (ms) over the guests, and how many answer.
stalls() {
  for v in $(seq 1 "$VMS"); do
    curl -sf "$addr/v1/vms/vm$v/guest" | jq '.status | .max_stall_ticks / .tsc_khz'
  done | sort -n | tail -1
}
written() { curl -sf "$addr/v1/vms/vm$1/guest" | jq '.status.pages_written' 2>/dev/null || echo 0; }

start_node
until curl -sf "$addr/v1/status" | jq -e '.leader == 1' >/dev/null 2>&1; do sleep 0.2; done
until [ "$(curl -sf "$addr/v1/state" | jq '.hosts | length')" = 1 ]; do sleep 0.2; done
for v in $(seq 1 "$VMS"); do
  TERN_SERVER=$addr "$TERN" vm create "vm$v" --memory "$MEM" --disk 16M --workload "$WORKLOAD" --host 1 >/dev/null
done
until [ "$(curl -sf "$addr/v1/local" | jq '[.[] | select(.running)] | length')" = "$VMS" ]; do sleep 0.2; done
sleep "$WARMUP"
echo "node restart: $VMS VMs x $MEM, workload $WORKLOAD, $RUNS restarts (kill -9, start again)"
echo "| run | time until all $VMS VMs reported | largest guest stall before | after |"
echo "|---|---|---|---|"
times=()
for r in $(seq 1 "$RUNS"); do
  before=$(stalls)
  declare -A w0=()
  for v in $(seq 1 "$VMS"); do w0[$v]=$(written "$v"); done
  vmms_before=$(vmm_pids | sort | tr '\n' ' ')
  kill -9 "$node_pid"
  t0=$(date +%s%N)
  # The old process must be gone (its listening socket closed) before the new one binds.
  while [ -e "/proc/$node_pid" ]; do sleep 0.01; done
  start_node
  deadline=$(( $(date +%s) + 120 ))
  until [ "$(curl -sf "$addr/v1/local" 2>/dev/null | jq '[.[] | select(.running)] | length' 2>/dev/null)" = "$VMS" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "node did not report $VMS VMs (log: $dir/n1.log)" >&2; tail -5 "$dir/n1.log" >&2; exit 1; }
    sleep 0.05
  done
  for v in $(seq 1 "$VMS"); do
    until [ "$(written "$v")" -gt "${w0[$v]}" ]; do
      [ "$(date +%s)" -lt "$deadline" ] || { echo "vm$v made no progress" >&2; exit 1; }
      sleep 0.05
    done
  done
  t1=$(date +%s%N)
  after=$(stalls)
  vmms_after=$(vmm_pids | sort | tr '\n' ' ')
  [ "$vmms_before" = "$vmms_after" ] || echo "  VMM processes changed: $vmms_before -> $vmms_after" >&2
  ms=$(( (t1 - t0) / 1000000 ))
  times+=("$ms")
  printf '| %s | %s ms | %.1f ms | %.1f ms |\n' "$r" "$ms" "$before" "$after"
  sleep 2
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
echo "time until reported: median $(echo "$sorted" | sed -n "$(( (RUNS + 1) / 2 ))p") ms, range $(echo "$sorted" | head -1)-$(echo "$sorted" | tail -1) ms"
mism=0
for v in $(seq 1 "$VMS"); do
  m=$(curl -sf "$addr/v1/vms/vm$v/guest" | jq '.status.mismatches')
  mism=$((mism + m))
done
echo "guest mismatches after all restarts: $mism"
echo "load: $(uptime)"
