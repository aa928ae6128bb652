#!/usr/bin/env bash
# Runs every policy on the PlanetLab days and prints one table row per (day, policy), plus
# wall time and peak memory of the release binary (GNU time).
# Usage: bench/sim_planetlab.sh /path/to/planetlab [extra tern sim flags, e.g. --cloudsim-compat]
set -euo pipefail
dir=${1:?planetlab directory (holding 20110303/ ...)}
shift
cargo build --release -q
bin=target/release/tern
echo "load: $(uptime)"
printf "%-9s %-8s %9s %8s %8s %10s %10s %8s %8s %8s %7s %8s\n" day policy kWh SLATAH% PDM% ESV migrations unmet% imbal active wall_s maxRSS_MB
for day in 20110303 20110306 20110309; do
  order=()
  [ -f "$dir/cloudsim_vm_order_$day.tsv" ] && order=(--vm-order "$dir/cloudsim_vm_order_$day.tsv")
  for policy in none drs drs+dpm lr-mmt; do
    out=$( { /usr/bin/time -f "TIME %e %M" "$bin" sim --trace "$dir/$day" "${order[@]}" --policy "$policy" --json --quiet "$@" > /tmp/tern_sim_bench.json; } 2>&1 | grep TIME)
    python3 - "$day" "$policy" $out <<'PY'
import json, sys
day, policy, _, wall, rss = sys.argv[1:6]
r = json.load(open("/tmp/tern_sim_bench.json"))
print(f"{day:<9} {policy:<8} {r['energy_kwh']:9.2f} {100*r['slatah']:8.2f} {100*r['pdm']:8.3f} {r['esv']:10.3e} {r['migrations']:10d} {100*r['unmet_demand']:8.3f} {r['mean_imbalance']:8.4f} {r['mean_active_hosts']:8.1f} {float(wall):7.2f} {int(rss)/1024:8.1f}")
PY
  done
done
