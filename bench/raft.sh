#!/usr/bin/env bash
# Consensus benchmark: 3 `tern node` processes on loopback (durable sled log).
# Prints commit latency p50/p99 at ~100 writes/s (curl's per-request time to a follower-free
# leader, keep-alive off), throughput with 8 concurrent writers, and failover time
# (kill -9 of the leader until the first new commit). Usage: bench/raft.sh [path/to/tern]
set -euo pipefail
TERN=${1:-target/release/tern}
DIR=$(mktemp -d); NET="127.$((RANDOM % 200 + 20)).$((RANDOM % 200 + 20))"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
"$TERN" node --id 1 --listen $NET.1:7400 --data $DIR/1 --bootstrap >/dev/null 2>&1 & PIDS+=($!)
sleep 1
for i in 2 3; do "$TERN" node --id $i --listen $NET.$i:7400 --data $DIR/$i --join $NET.1:7400 >/dev/null 2>&1 & PIDS+=($!); done
sleep 3
W='{"command":{"op":"noop"}}'
post() { curl -s -o /dev/null -w '%{time_total}\n' -XPOST "$1/v1/write" -H 'content-type: application/json' -d "$W"; }
: > $DIR/lat
for i in $(seq 1 500); do post $NET.1:7400 >> $DIR/lat; sleep 0.01; done
sort -n $DIR/lat | awk '{a[NR]=$1} END {printf "commit latency (500 writes, ~100/s): p50 %.2f ms  p99 %.2f ms\n", a[int(NR*0.5)]*1000, a[int(NR*0.99)]*1000}'
start=$(date +%s%N)
seq 1 2000 | xargs -P 8 -I{} curl -s -o /dev/null -XPOST $NET.1:7400/v1/write -H 'content-type: application/json' -d "$W"
end=$(date +%s%N)
echo "throughput (2000 writes, 8 concurrent clients): $(( 2000 * 1000000000 / (end - start) )) writes/s"
kill -9 "${PIDS[0]}"; t0=$(date +%s%N)
until curl -sf -o /dev/null -XPOST $NET.2:7400/v1/write -H 'content-type: application/json' -d "$W"; do sleep 0.01; done
t1=$(date +%s%N)
echo "failover (kill -9 of leader until first new commit): $(( (t1 - t0) / 1000000 )) ms"
echo "load: $(uptime)"
