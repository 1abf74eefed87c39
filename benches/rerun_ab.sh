#!/usr/bin/env bash
# Re-run cost of two builds, side by side: each round runs, for build A then
# build B, a stateless dry run of the 1M-row messy export, then an unchanged
# re-run of each against the state that benches/state.sh populated. Prints
# the medians of per-round ratios: each build's re-run against its own
# stateless dry run (issue 11's "≤ 1.1×"), and B against A. Runs of one round
# are seconds apart, so the VM's slow drifts hit both builds alike.
#
#   RUNS=11 benches/state.sh          # once: populates bench-data/state-bench.db
#   benches/rerun_ab.sh 13 /tmp/crm-old target/release/crm-import
#
# The re-runs must all be `unchanged` (neither build may change the state);
# the script checks the last report of each. Needs GNU time and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=$1
a=$(realpath "$2")
b=$(realpath "$3")
export CHATFUEL_API_TOKEN=${CHATFUEL_API_TOKEN:-sandbox-token}
export WENI_API_TOKEN=${WENI_API_TOKEN:-sandbox-token}
export CLOUDHUMANS_API_TOKEN=${CLOUDHUMANS_API_TOKEN:-sandbox-token}
data=bench-data
csv=$data/crm-messy-1000000.csv
[[ -f $data/state-bench.toml && -f $data/state-bench.db ]] || {
  echo "run benches/state.sh first (it populates $data/state-bench.db)" >&2
  exit 2
}
times=$(mktemp)
trap 'rm -f "$times"' EXIT
for _ in $(seq "$runs"); do
  for side in A B; do
    bin=$a; [[ $side == B ]] && bin=$b
    /usr/bin/time -f "dry-$side %e %U %S" -a -o "$times" "$bin" run -q --dry-run \
      --config fixtures/bench.toml --report "$data/rerun-ab-dry.csv" "$csv" >/dev/null 2>&1
  done
  for side in A B; do
    bin=$a; [[ $side == B ]] && bin=$b
    /usr/bin/time -f "re-$side %e %U %S" -a -o "$times" "$bin" run -q \
      --config "$data/state-bench.toml" --report "$data/rerun-ab-re-$side.csv" "$csv" >/dev/null 2>&1
  done
done
# Checked once, after the loop, so that reading the reports does not sit between timed runs.
for side in A B; do
  if grep -qv ',unchanged,\|,duplicate,\|,invalid_phone,\|^source,' "$data/rerun-ab-re-$side.csv"; then
    echo "$side's re-run was not all unchanged: the state no longer matches the export" >&2
    exit 1
  fi
done
python3 - "$times" "$a" "$b" <<'PY'
import statistics, sys
path, a, b = sys.argv[1:]
rounds, current = [], {}
for line in open(path):
    name, wall, user, sys_ = line.split()
    if name == "dry-A":
        current = {}
        rounds.append(current)
    current[name] = (float(wall), float(user) + float(sys_))
rounds = [r for r in rounds if len(r) == 4]
def median(f, i):
    return statistics.median(f(r, i) for r in rounds)
print(f"A = {a}\nB = {b}\n{len(rounds)} rounds; medians of per-round ratios:")
for label, f in [
    ("A: re-run / stateless dry run", lambda r, i: r["re-A"][i] / r["dry-A"][i]),
    ("B: re-run / stateless dry run", lambda r, i: r["re-B"][i] / r["dry-B"][i]),
    ("stateless dry run, B / A", lambda r, i: r["dry-B"][i] / r["dry-A"][i]),
    ("re-run, B / A", lambda r, i: r["re-B"][i] / r["re-A"][i]),
]:
    print(f"  {label:32} wall {median(f, 0):.3f}x  CPU {median(f, 1):.3f}x")
for name in ["dry-A", "dry-B", "re-A", "re-B"]:
    wall = statistics.median(r[name][0] for r in rounds)
    cpu = statistics.median(r[name][1] for r in rounds)
    print(f"  {name:6} median wall {wall:.2f} s, CPU {cpu:.2f} s")
PY
