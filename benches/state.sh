#!/usr/bin/env bash
# Incremental-state benchmark (issue 4): a nightly re-run of an unchanged
# 1,000,000-row export with the state populated, against `crm-import sandbox`
# in a separate process on 127.0.0.1.
#
#   1. populate: one real run, all three sinks unthrottled (also reports its speed);
#   2. time RUNS dry runs that read the state, RUNS dry runs without any state
#      and RUNS real re-runs of the same file, alternating;
#   3. report the ratios of medians (re-run against each dry run), the requests
#      the re-runs made (must be 0), and the state's size per contact.
#
#   benches/state.sh          # ROWS=1000000 RUNS=5 PROFILE=messy
#   PROFILE=br benches/state.sh   # the 70%-Brazilian export of earlier issues
# Needs python3 (stdlib) and GNU time; uses fixtures/gen_crm_export.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
RUNS=${RUNS:-5}
DATA=bench-data
mkdir -p "$DATA"
cargo build --release --quiet
BIN=target/release/crm-import
PROFILE=${PROFILE:-messy}
CSV="$DATA/crm-$ROWS.csv"
[[ $PROFILE == br ]] || CSV="$DATA/crm-$PROFILE-$ROWS.csv"
[[ -f "$CSV" ]] || python3 fixtures/gen_crm_export.py --profile "$PROFILE" "$ROWS" "$CSV" "${CSV%.csv}.parquet"

"$BIN" sandbox --listen 127.0.0.1:0 > "$DATA/sandbox.out" &
SANDBOX_PID=$!
trap 'kill $SANDBOX_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  URL=$(sed -n 's/.*listening on //p' "$DATA/sandbox.out")
  [[ -n "$URL" ]] && break
  sleep 0.1
done

STATE="$DATA/state-bench.db"
rm -rf "$STATE" "$STATE-wal" "$STATE-shm" "$STATE.snapshots"
sed -e "s|^path = \"../bench-data/report.csv\"|path = \"state-bench-report.csv\"|" fixtures/bench.toml > "$DATA/state-bench.toml"
cat >> "$DATA/state-bench.toml" <<TOML
TOML
python3 - "$DATA/state-bench.toml" "$URL" <<'PY'
import sys
path, url = sys.argv[1], sys.argv[2]
text = open(path).read()
text = text.replace('[report]', '[state]\npath = "state-bench.db"\n\n[report]')
for sink in ("[sinks.chatfuel]", "[sinks.weni]", "[sinks.cloudhumans]"):
    text = text.replace(sink, f'{sink}\nbase_url = "{url}"\nrate = "100000/s"\nconcurrency = 8')
# Weni's group additions have their own pace (default 3000/h, 2.6 h for 775k contacts).
text = text.replace("[sinks.weni]", '[sinks.weni]\nactions_rate = "100000/s"')
open(path, "w").write(text)
PY
export CHATFUEL_API_TOKEN=sandbox-token WENI_API_TOKEN=sandbox-token CLOUDHUMANS_API_TOKEN=sandbox-token

requests() { python3 -c "import json,sys,urllib.request; l=json.load(urllib.request.urlopen(sys.argv[1]+'/_sandbox/log')); print(sum(s['requests'] for s in l['stats'].values()))" "$URL"; }

/usr/bin/time -f "%e %M" -o "$DATA/populate.time" "$BIN" run -q --config "$DATA/state-bench.toml" "$CSV" 2> "$DATA/populate.stderr" || true
read -r pop_s pop_kb < "$DATA/populate.time"
after_populate=$(requests)

dry=(); stateless=(); rerun=(); rss=0
time_stateless() {
  # The same dry run without any state (fixtures/bench.toml names no state file that exists).
  /usr/bin/time -f "%e %M" -o "$DATA/t" "$BIN" run -q --dry-run --config fixtures/bench.toml \
    --report "$DATA/state-bench-stateless.csv" "$CSV" 2>/dev/null || true
  read -r t _ < "$DATA/t"; stateless+=("$t")
}
time_rerun() {
  /usr/bin/time -f "%e %M" -o "$DATA/t" "$BIN" run -q --config "$DATA/state-bench.toml" "$CSV" 2> "$DATA/rerun.stderr" || true
  read -r t m < "$DATA/t"; rerun+=("$t")
  if (( m > rss )); then rss=$m; fi
}
for round in $(seq "$RUNS"); do
  /usr/bin/time -f "%e %M" -o "$DATA/t" "$BIN" run -q --dry-run --config "$DATA/state-bench.toml" "$CSV" 2>/dev/null || true
  read -r t _ < "$DATA/t"; dry+=("$t")
  # A run can pay for the writeback of the report the run before it wrote, so
  # the stateless dry run and the re-run swap places every round.
  if (( round % 2 )); then time_stateless; time_rerun; else time_rerun; time_stateless; fi
done
after_reruns=$(requests)
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
dry_m=$(median "${dry[@]}"); rerun_m=$(median "${rerun[@]}"); stateless_m=$(median "${stateless[@]}")
unique=$(grep -o '[0-9,]* unique phones' "$DATA/rerun.stderr" | head -1 | tr -d ', a-z')
bytes=$(stat -c %s "$STATE")
# The snapshot files beside the state (a cache of it, src/state/snapshot.rs).
snapshots=$(du -sb "$STATE.snapshots" 2>/dev/null | cut -f1); snapshots=${snapshots:-0}
python3 - <<PY
pop_s, pop_kb = $pop_s, $pop_kb
dry, rerun = $dry_m, $rerun_m
unique, size, snapshots = int("$unique"), $bytes, $snapshots
print(f"populate (real run, 3 sinks, unthrottled sandbox): {pop_s:.1f} s, peak {pop_kb/1024:.0f} MB, {$after_populate} requests")
print(f"dry run median {dry:.2f} s ({$RUNS} runs: ${dry[*]}); unchanged re-run median {rerun:.2f} s (${rerun[*]}); ratio {rerun/dry:.2f}x; re-run peak RSS {$rss/1024:.0f} MB")
print(f"stateless dry run median {$stateless_m:.2f} s (${stateless[*]}); re-run / stateless dry run {rerun/$stateless_m:.2f}x")
# Runs alternate, so each round's ratio compares runs made seconds apart: its
# median follows this VM's slow drifts of speed less than a ratio of medians.
import statistics
rounds = list(zip([$(IFS=,; echo "${rerun[*]}")], [$(IFS=,; echo "${stateless[*]}")], [$(IFS=,; echo "${dry[*]}")]))
print(f"per-round ratios, median: re-run / stateless dry run {statistics.median(r / s for r, s, _ in rounds):.2f}x, re-run / dry run {statistics.median(r / d for r, _, d in rounds):.2f}x")
print(f"requests made by the {$RUNS} re-runs: {$after_reruns - $after_populate}")
print(f"state: {size/1e6:.1f} MB for {unique} contacts x 3 sinks = {size/unique:.0f} bytes per contact ({size/unique/3:.0f} per contact and sink)")
print(f"snapshot files beside it: {snapshots/1e6:.1f} MB, {snapshots/unique:.0f} bytes per contact; both: {(size+snapshots)/unique:.0f} bytes per contact")
grep_unchanged = open("$DATA/rerun.stderr").read()
print([l.strip() for l in grep_unchanged.splitlines() if "unchanged" in l])
PY
