#!/usr/bin/env bash
# The generated data-centre fleet (default 10,000 hosts / 200,000 VMs) under each policy for
# each length of run: CPU time (user + system), wall time and peak memory of the release
# binary (GNU time), with the run's energy, SLATAH, unmet demand and migrations.
# Usage: bench/sim_scale.sh [path/to/tern]   env: HOSTS VMS DAYS="1 7" POLICIES="none drs drs+dpm lr-mmt" RUNS=1
set -euo pipefail
bin=${1:-target/release/tern}
hosts=${HOSTS:-10000}
vms=${VMS:-200000}
echo "load: $(uptime)"
printf "%-8s %5s %3s | %8s %8s %8s | %9s %8s %8s %10s\n" policy days run cpu_s wall_s RSS_MB kWh SLATAH% unmet% migrations
for days in ${DAYS:-1 7}; do
  for policy in ${POLICIES:-none drs drs+dpm lr-mmt}; do
    for run in $(seq 1 "${RUNS:-1}"); do
      out=$( { /usr/bin/time -f "TIME %U %S %e %M" "$bin" sim --synthetic --hosts "$hosts" --vms "$vms" \
        --days "$days" --policy "$policy" --json --quiet > /tmp/tern_sim_scale.json; } 2>&1 | grep TIME)
      python3 - "$policy" "$days" "$run" $out <<'PY'
import json, sys
policy, days, run, _, user, sys_s, wall, rss = sys.argv[1:9]
r = json.load(open("/tmp/tern_sim_scale.json"))
print(f"{policy:<8} {days:>5} {run:>3} | {float(user) + float(sys_s):8.2f} {float(wall):8.2f} {int(rss) / 1024:8.1f} | "
      f"{r['energy_kwh']:9.1f} {100 * r['slatah']:8.2f} {100 * r['unmet_demand']:8.3f} {r['migrations']:10d}")
PY
    done
  done
done
rm -f /tmp/tern_sim_scale.json
