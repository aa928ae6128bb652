#!/usr/bin/env bash
# Evacuation benchmark: 3 `tern node` processes on loopback with a shared datastore, $VMS VMs
# (default 8 x 512 MiB, self-verifying test guest) all on host 1; host 1 enters maintenance
# mode and the cluster live-migrates everything off it. Measured twice on a fresh cluster:
# concurrent (4 outbound slots) and one at a time (1 outbound slot). Prints time to empty the
# host and per-migration downtime / total time / bytes from the audit trail, plus the guests'
# mismatch count. WARMUP seconds (default 20) let each guest touch its working set first.
# Usage: bench/evacuation.sh [path/to/tern]   env: VMS MEM WORKLOAD WARMUP
set -euo pipefail
TERN=${1:-target/release/tern}
VMS=${VMS:-8}
MEM=${MEM:-512M}
WORKLOAD=${WORKLOAD:-wss=128M,rate=2000,pattern=random,duty=20}
WARMUP=${WARMUP:-20}
PIDS=()
DIRS=()
# Kill the VMMs (one process per VM, outliving their node) started under data dir $1, each
# checked against its command line so that a reused pid is never signalled.
kill_vmms() {
  for f in "$1"/n*/run/vms/*/pid; do
    [ -f "$f" ] || continue
    local p; p=$(cat "$f")
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "$(dirname "$f")" && kill -9 "$p" 2>/dev/null
  done
  return 0
}
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for d in "${DIRS[@]}"; do kill_vmms "$d"; rm -rf "$d"; done
}
trap cleanup EXIT

# Commit a command, retrying while the cluster settles (membership changes, elections).
write() {
  for _ in $(seq 50); do
    curl -sf -XPOST "$1/v1/write" -H 'content-type: application/json' -d "{\"command\":$2}" >/dev/null && return 0
    sleep 0.2
  done
  echo "write $2 failed" >&2; return 1
}

# run MODE PER_SOURCE: one evacuation on a fresh cluster; prints one table row.
run() {
  local mode=$1 per_source=$2
  local dir; dir=$(mktemp -d); DIRS+=("$dir")
  local net="127.$((RANDOM % 200 + 20)).$((RANDOM % 200 + 20))"
  local s1=$net.1:7400
  local mine=()
  for i in 1 2 3; do
    local join=(--bootstrap)
    [ "$i" = 1 ] || join=(--join "$s1")
    "$TERN" node --id $i --listen $net.$i:7400 --data "$dir/n$i" --datastore "$dir/ds" \
      "${join[@]}" >/dev/null 2>"$dir/n$i.log" &
    PIDS+=($!); mine+=($!); disown $!
    [ "$i" = 1 ] && until curl -sf "$s1/v1/status" | jq -e '.leader == 1' >/dev/null; do sleep 0.2; done
  done
  until [ "$(curl -sf "$s1/v1/state" | jq '.hosts | length')" = 3 ]; do sleep 0.2; done
  write "$s1" '{"op":"set_drs","settings":{"automation":"manual","migration_threshold":3,"interval_s":3600}}'
  write "$s1" "{\"op\":\"set_slots\",\"slots\":{\"per_source\":$per_source,\"per_destination\":4,\"per_cluster\":8}}"
  for v in $(seq 1 "$VMS"); do
    TERN_SERVER=$s1 "$TERN" vm create "vm$v" --memory "$MEM" --workload "$WORKLOAD" --host 1 >/dev/null \
      || { echo "creating vm$v failed (logs: $dir)" >&2; return 1; }
  done
  until [ "$(curl -sf "$s1/v1/local" | jq '[.[] | select(.running)] | length')" = "$VMS" ]; do sleep 0.2; done
  sleep "$WARMUP"
  local t0 t1
  t0=$(date +%s%N)
  TERN_SERVER=$s1 "$TERN" host maintenance enter 1 --wait >/dev/null 2>&1
  t1=$(date +%s%N)
  # The host is empty once every ownership moved; the tasks' final records follow shortly.
  until [ "$(curl -sf "$s1/v1/state" | jq '[.tasks[] | select(.state == "queued" or .state == "running")] | length')" = 0 ]; do sleep 0.2; done
  local state; state=$(curl -sf "$s1/v1/state")
  local mism=0
  for v in $(seq 1 "$VMS"); do
    local owner; owner=$(echo "$state" | jq ".vms.vm$v.owner")
    local m; m=$(curl -sf "$net.$owner:7400/v1/vms/vm$v/guest" | jq '.status.mismatches')
    mism=$((mism + m))
  done
  echo "$state" | jq -r --arg mode "$mode" --arg secs "$(( (t1 - t0) / 1000000 ))" --arg mism "$mism" '
    [.tasks[] | select(.state == "succeeded")] as $t
    | ($t | map(.stats.downtime_us / 1000) | sort) as $d
    | ($t | map(.stats.total_ms / 1000)) as $tot
    | "| \($mode) | \($t | length)/\(.tasks | length) | \(($secs | tonumber) / 1000) s | "
      + "\($d | add / length | . * 10 | round / 10) ms | \($d[($d | length) / 2 | floor] | . * 10 | round / 10) ms | "
      + "\($d | max | . * 10 | round / 10) ms | \($tot | add / length | . * 100 | round / 100) s | "
      + "\($t | map(.stats.bytes) | add / 1048576 | round) MiB | \($mism) |"'
  echo "$state" | jq -r '.tasks[] | select(.state != "succeeded")
    | "  task \(.id) \(.vm) \(.from)->\(.to) \(.state): \(.error)"' >&2
  for p in "${mine[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  kill_vmms "$dir"
  PIDS=()  # all killed: never signal a PID that may have been reused since
}

echo "evacuation of host 1: $VMS VMs x $MEM, workload $WORKLOAD, 3 nodes on loopback"
echo "| mode | migrations ok | time to empty | downtime mean | downtime p50 | downtime max | per-migration total mean | bytes moved | guest mismatches |"
echo "|---|---|---|---|---|---|---|---|---|"
run "concurrent (4 outbound slots)" 4
run "one at a time (1 outbound slot)" 1
echo "load: $(uptime)"
