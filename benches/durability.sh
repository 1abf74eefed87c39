#!/usr/bin/env bash
# What the fsync'd CloudHumans in-flight markers cost (issue 8): CloudHumans
# messages/s against `crm-import sandbox` (no throttle) with markers committed
# `synchronous = FULL` (this build) versus `NORMAL` (a second build of the same
# tree with only that pragma changed, given as OTHER_BIN), alternated RUNS
# times in one session, fresh state each run.
#
#   OTHER_BIN=/path/to/crm-import-normal benches/durability.sh   # ROWS=5000 RUNS=3
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-5000}
RUNS=${RUNS:-3}
DATA=bench-data
mkdir -p "$DATA"
cargo build --release --quiet
BIN=target/release/crm-import
: "${OTHER_BIN:?set OTHER_BIN to a build with synchronous = NORMAL for markers}"

"$BIN" sandbox --listen 127.0.0.1:0 > "$DATA/sandbox.out" &
SANDBOX_PID=$!
trap 'kill $SANDBOX_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  URL=$(sed -n 's/.*listening on //p' "$DATA/sandbox.out"); [[ -n "$URL" ]] && break; sleep 0.1
done
python3 - "$ROWS" "$DATA/durability.csv" <<'PY'
import sys
n, out = int(sys.argv[1]), sys.argv[2]
with open(out, "w") as f:
    f.write("id,phone\n")
    for i in range(n):
        f.write(f"{i+1},+55 11 9{70000000 + i * 3:08d}\n")
PY
cat > "$DATA/durability.toml" <<TOML
[input]
phone_column = "phone"
default_region = "BR"
[report]
path = "durability-report.csv"
[state]
path = "durability-state.db"
[sinks.cloudhumans]
base_url = "$URL"
account_id = "1"
inbox_id = "2"
template_name = "welcome_v2"
rate = "100000/s"
concurrency = 8
TOML
one() { # label bin
  rm -f "$DATA"/durability-state.db*
  local start end
  start=$(date +%s.%N)
  CLOUDHUMANS_API_TOKEN=sandbox-token "$2" run -q --resend-messages --config "$DATA/durability.toml" "$DATA/durability.csv" 2>/dev/null
  end=$(date +%s.%N)
  python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'$1 {s:.2f}s {int(sys.argv[3])/s:.0f} messages/s')" "$start" "$end" "$ROWS"
}
for _ in $(seq "$RUNS"); do
  one FULL "$BIN"
  one NORMAL "$OTHER_BIN"
done
