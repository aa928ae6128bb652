#!/usr/bin/env bash
# Guest page write rate: the same test-guest image and workload under QEMU/KVM and under
# Tern's VMM (`tern vm run --json`); prints pages/s for both and the ratio Tern/QEMU.
#
# usage: bench/guest-rate.sh
# env:   MEM=1G CPUS=2 WORKLOAD="wss=256M rate=0 pattern=seq" SECS=10 WARMUP=2
#        TERN=path/to/tern (default: builds target/release/tern)  QEMU=qemu-system-x86_64
# Needs /dev/kvm, python3 (talks to QEMU's monitor) and QEMU for the QEMU half.
set -euo pipefail

MEM=${MEM:-1G}
CPUS=${CPUS:-2}
WORKLOAD=${WORKLOAD:-"wss=256M rate=0 pattern=seq"}
SECS=${SECS:-10}
WARMUP=${WARMUP:-2}
QEMU=${QEMU:-qemu-system-x86_64}
cd "$(dirname "$0")/.."

if [[ -z "${TERN:-}" ]]; then
    cargo build --release --quiet --bin tern
    TERN=target/release/tern
fi

work=$(mktemp -d)
qemu_pid=""
tern_pid=""
cleanup() {
    [[ -n "$qemu_pid" ]] && kill "$qemu_pid" 2>/dev/null || true
    [[ -n "$tern_pid" ]] && kill "$tern_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$TERN" guest-image --out "$work/guest.elf" >/dev/null
echo "workload: '$WORKLOAD', $CPUS vCPUs, $MEM RAM, measured over ${SECS}s after ${WARMUP}s warm-up"
echo "host load: $(uptime)"

# Reads the guest status page through QEMU's human monitor; prints
# "<host monotonic seconds> <state> <vcpus> <pages_written> <pages_verified> <mismatches> <max_stall_ticks> <tsc_khz>"
monitor_status() {
    python3 - "$1" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
def until_prompt():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")
until_prompt()
s.sendall(b"xp /12gx 0x200000\n")
t = time.monotonic()
out = until_prompt()
words = []
for line in out.splitlines():
    if line.startswith("0000000000200"):
        words += [int(w, 16) for w in line.split(":", 1)[1].split()]
if len(words) < 12:
    sys.exit("cannot read the status page: " + out)
magic, st, written, verified, mism, stall, hb, hbt, khz, pages, first, cpus = words
if magic != 0x544154534E524554:
    print(f"{t} booting 0 0 0 0 0 0")
else:
    print(f"{t} {st >> 32} {cpus & 0xffffffff} {written} {verified} {mism} {stall} {khz}")
PY
}

rate_between() { # t0 w0 t1 w1
    python3 -c "import sys; t0,w0,t1,w1=map(float,sys.argv[1:]); print(int((w1-w0)/(t1-t0)))" "$@"
}

qemu_rate=""
if command -v "$QEMU" >/dev/null; then
    "$QEMU" -enable-kvm -cpu host,-arch-capabilities -m "$MEM" -smp "$CPUS" \
        -kernel "$work/guest.elf" -append "$WORKLOAD" -display none -no-reboot \
        -serial "file:$work/qemu-serial.log" -monitor "unix:$work/mon.sock,server,nowait" \
        2>"$work/qemu.err" &
    qemu_pid=$!
    for _ in $(seq 1 600); do
        [[ -S "$work/mon.sock" ]] && read -r _t state vcpus _rest < <(monitor_status "$work/mon.sock") || state=x
        if [[ "$state" == 2 ]]; then echo "guest error under QEMU:"; cat "$work/qemu-serial.log"; exit 1; fi
        [[ "$state" == 1 && "$vcpus" == "$CPUS" ]] && break
        sleep 0.5
    done
    [[ "$state" == 1 ]] || { echo "QEMU guest did not start running"; exit 1; }
    sleep "$WARMUP"
    read -r t0 _ _ w0 _ _ _ _ < <(monitor_status "$work/mon.sock")
    sleep "$SECS"
    read -r t1 _ _ w1 _ m1 stall khz < <(monitor_status "$work/mon.sock")
    qemu_rate=$(rate_between "$t0" "$w0" "$t1" "$w1")
    echo "qemu: $qemu_rate pages/s (mismatches $m1, max stall $((stall / (khz > 0 ? khz : 1))) ms, tsc_khz $khz)"
    kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=""
else
    echo "qemu: $QEMU not installed, skipped"
fi

tern_rate=""
if "$TERN" vm run --help 2>/dev/null | grep -q -- "--json"; then
    # `tern vm run --json` prints one JSON line per second: elapsed_s and the guest status.
    "$TERN" vm run --json --memory "$MEM" --vcpus "$CPUS" --workload "${WORKLOAD// /,}" \
        --for "$((WARMUP + SECS + 2))s" >"$work/tern.jsonl" 2>"$work/tern.err" &
    tern_pid=$!
    wait "$tern_pid" || true
    tern_pid=""
    tern_rate=$(python3 - "$work/tern.jsonl" "$WARMUP" "$SECS" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        o = json.loads(line)
    except ValueError:
        continue
    st = o.get("status") or {}
    t = o.get("elapsed_s")
    if "pages_written" in st and t is not None and st.get("vcpus_running", 0) > 0:
        rows.append((float(t), st["pages_written"]))
if len(rows) < 2:
    sys.exit(0)
warm, secs = float(sys.argv[2]), float(sys.argv[3])
start = next((r for r in rows if r[0] >= rows[0][0] + warm), rows[0])
end = next((r for r in rows if r[0] >= start[0] + secs), rows[-1])
if end[0] > start[0]:
    print(int((end[1] - start[1]) / (end[0] - start[0])))
PY
)
    if [[ -n "$tern_rate" ]]; then echo "tern: $tern_rate pages/s"; else echo "tern: no status lines parsed:"; head -5 "$work/tern.jsonl" "$work/tern.err"; fi
else
    echo "tern: \`tern vm run --json\` not available in $TERN, skipped"
fi

if [[ -n "$qemu_rate" && -n "$tern_rate" && "$qemu_rate" -gt 0 ]]; then
    python3 -c "import sys; print(f'ratio tern/qemu: {int(sys.argv[1])/int(sys.argv[2]):.3f}')" "$tern_rate" "$qemu_rate"
fi
