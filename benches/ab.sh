#!/usr/bin/env bash
# Side-by-side timing of builds: runs each binary RUNS times with the same
# arguments, alternating them run by run (so that the VM's slow and fast
# phases hit all of them alike), and prints medians of wall time and CPU
# (user + sys) and the largest peak RSS.
#
#   benches/ab.sh 11 "run -q --config ../fixtures/bench.toml --dry-run crm-messy-1000000.csv" /tmp/crm-old /tmp/crm-new
#
# Runs in the current directory; sets the sandbox tokens so real re-runs
# against a populated state (benches/state.sh) can be timed too. Needs GNU time.
set -euo pipefail
runs=$1; args=$2; shift 2
export CHATFUEL_API_TOKEN=${CHATFUEL_API_TOKEN:-sandbox-token}
export WENI_API_TOKEN=${WENI_API_TOKEN:-sandbox-token}
export CLOUDHUMANS_API_TOKEN=${CLOUDHUMANS_API_TOKEN:-sandbox-token}
times=$(mktemp)
trap 'rm -f "$times"' EXIT
for _ in $(seq "$runs"); do
  for bin in "$@"; do
    # shellcheck disable=SC2086 # the arguments are one string on purpose
    /usr/bin/time -f "$bin %e %U %S %M" -a -o "$times" "$bin" $args >/dev/null 2>&1 || true
  done
done
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for bin in "$@"; do
  wall=$(grep "^$bin " "$times" | awk '{print $2}' | median)
  range=$(grep "^$bin " "$times" | awk '{print $2}' | sort -g | sed -n '1p;$p' | paste -sd' ')
  cpu=$(grep "^$bin " "$times" | awk '{print $3 + $4}' | median)
  rss=$(grep "^$bin " "$times" | awk '{print $5}' | sort -g | tail -1)
  echo "$bin: wall median $wall s (min max: $range), CPU median $cpu s, peak RSS $((rss / 1024)) MB"
done
