#!/usr/bin/env bash
# Runs every policy of the CloudSim 4.0 reference table (NPA, DVFS, THR/IQR/MAD/LR/LRR x
# MMT/MC) on PlanetLab 20110303 with --cloudsim-compat and prints each figure next to
# CloudSim's, with the gap, plus this run's CPU time, wall time and peak memory.
# Usage: bench/sim_cloudsim_family.sh /path/to/planetlab [path/to/tern]
set -euo pipefail
dir=${1:?planetlab directory (holding 20110303/ and cloudsim-4.0-reference-20110303.tsv)}
bin=${2:-target/release/tern}
ref="$dir/cloudsim-4.0-reference-20110303.tsv"
echo "load: $(uptime)"
printf "%-8s | %8s %8s %6s | %6s %6s %6s | %6s %6s %6s | %5s %5s %6s | %5s %5s %6s\n" \
  policy kWh ref gap% mig ref gap% SLATAH ref gap% PDM ref gap% cpu_s wall_s RSS_MB
tail -n +2 "$ref" | while IFS=$'\t' read -r name _param kwh mig slatah pdm _slav; do
  policy=${name/_/-}
  out=$( { /usr/bin/time -f "TIME %U %S %e %M" "$bin" sim --trace "$dir/20110303" \
    --vm-order "$dir/cloudsim_vm_order_20110303.tsv" --policy "$policy" --cloudsim-compat \
    --json --quiet > /tmp/tern_sim_family.json; } 2>&1 | grep TIME)
  python3 - "$policy" "$kwh" "$mig" "$slatah" "$pdm" $out <<'PY'
import json, sys
policy, kwh, mig, slatah, pdm, _, user, sys_s, wall, rss = sys.argv[1:11]
r = json.load(open("/tmp/tern_sim_family.json"))
def gap(a, b):
    b = float(b)
    return f"{100 * (a - b) / b:+6.1f}" if b else "     -"
e, m, s, p = r["energy_kwh"], r["migrations"], 100 * r["slatah"], 100 * r["pdm"]
print(f"{policy:<8} | {e:8.2f} {float(kwh):8.2f} {gap(e, kwh)} | {m:6d} {int(mig):6d} {gap(m, mig)} | "
      f"{s:6.2f} {float(slatah):6.2f} {gap(s, slatah)} | {p:6.3f} {float(pdm):6.2f} {gap(p, pdm)} | "
      f"{float(user) + float(sys_s):5.2f} {float(wall):5.2f} {int(rss) / 1024:6.1f}")
PY
done
