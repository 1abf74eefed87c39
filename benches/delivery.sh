#!/usr/bin/env bash
# Delivery benchmarks against `crm-import sandbox` running as a separate process
# on 127.0.0.1 (issue 3):
#   (a) rate accuracy: CloudHumans at rate = "50/s" on 3,000 rows, sandbox limit
#       60/s: achieved rate over the middle 80% of the run (from the sandbox's
#       own receive timestamps) and the number of 429s;
#   (b) ceiling: Chatfuel, 1,000,000 phones, no rate limit: requests/s, rows/s;
#   (c) peak RSS of crm-import while sending those 1,000,000 rows;
#   (d) lanes (issue 7): sandbox Weni throttled to 10/s; Chatfuel (5/s, batches
#       of 100) and CloudHumans (200/s) on LANE_ROWS unique phones: each fast
#       sink's achieved rate over the middle 80% of its own requests while Weni
#       is throttled (target >= 97% of its configured rate);
#   (e) peak RSS for the 1,000,000-row export with Weni stalled (1/s against a
#       sandbox at 1/s) and Chatfuel unthrottled, --max-duration 60s: Weni's
#       backlog waits on disk (target <= 64 MB + 32 B per unique phone).
#
#   benches/delivery.sh            # ROWS=1000000 RATE_ROWS=3000 LANE_ROWS=6000
#   ONLY=lanes benches/delivery.sh # just (d) and (e)
# Needs python3 (stdlib only) and GNU time. Uses fixtures/gen_crm_export.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
RATE_ROWS=${RATE_ROWS:-3000}
LANE_ROWS=${LANE_ROWS:-6000}
DATA=bench-data
mkdir -p "$DATA"
cargo build --release --quiet
BIN=target/release/crm-import

start_sandbox() { # args... → sets SANDBOX_PID and SANDBOX_URL
  "$BIN" sandbox --listen 127.0.0.1:0 "$@" > "$DATA/sandbox.out" &
  SANDBOX_PID=$!
  for _ in $(seq 100); do
    SANDBOX_URL=$(sed -n 's/.*listening on //p' "$DATA/sandbox.out")
    [[ -n "$SANDBOX_URL" ]] && return
    sleep 0.1
  done
  echo "sandbox did not start" >&2
  exit 1
}
stop_sandbox() { kill "$SANDBOX_PID" 2>/dev/null || true; wait "$SANDBOX_PID" 2>/dev/null || true; }
trap stop_sandbox EXIT

# Unique valid phones only, so every row is one request.
unique_phones() { # n out.csv
python3 - "$1" "$2" <<'PY'
import sys
n, out = int(sys.argv[1]), sys.argv[2]
with open(out, "w") as f:
    f.write("id,phone,first_name\n")
    for i in range(n):
        f.write(f"{i+1},+55 11 9{60000000 + i * 3:08d},Ana\n")
PY
}

lanes() {
unique_phones "$LANE_ROWS" "$DATA/lanes.csv"
start_sandbox --rate weni=10/s
cat > "$DATA/lanes.toml" <<TOML
[input]
phone_column = "phone"
default_region = "BR"
[report]
path = "lanes-report.csv"
[state]
path = "lanes-state.db"
[sinks.chatfuel]
base_url = "$SANDBOX_URL"
automation_id = "62ed0d816e5d77079f07db49"
batch_size = 100
rate = "5/s"
concurrency = 2
[sinks.weni]
base_url = "$SANDBOX_URL"
name = "{first_name}"
rate = "10/s"
concurrency = 1
[sinks.cloudhumans]
base_url = "$SANDBOX_URL"
account_id = "1"
inbox_id = "2"
template_name = "welcome_v2"
rate = "200/s"
concurrency = 4
TOML
rm -f "$DATA"/lanes-state.db*
CHATFUEL_API_TOKEN=sandbox-token WENI_API_TOKEN=sandbox-token CLOUDHUMANS_API_TOKEN=sandbox-token \
  "$BIN" run -q --max-duration 45s --config "$DATA/lanes.toml" "$DATA/lanes.csv" 2> "$DATA/lanes.stderr" || true
python3 - "$SANDBOX_URL" <<'PY'
import json, sys, urllib.request
log = json.load(urllib.request.urlopen(sys.argv[1] + "/_sandbox/log"))
def middle(ts, configured, what):
    ts = sorted(ts)
    n = len(ts)
    lo, hi = int(n * 0.1), int(n * 0.9) - 1
    rate = (hi - lo) / ((ts[hi] - ts[lo]) / 1000.0)
    print(f"(d) {what}: {n} requests, middle-80% rate {rate:.2f}/s = {rate / configured * 100:.1f}% of {configured}/s")
    return ts[-1]
c = middle([r["at_ms"] for r in log["chatfuel"]["requests"]], 5, "chatfuel")
m = middle([r["at_ms"] for r in log["cloudhumans"]["messages"]], 200, "cloudhumans")
w = [x["at_ms"] for x in log["weni"]["writes"]]
print(f"(d) weni: {len(w)} writes in the run, {sum(1 for t in w if t > max(c, m))} of them after both fast sinks had finished")
PY
stop_sandbox
}

stalled() {
CSV="$DATA/crm-$ROWS.csv"
[[ -f "$CSV" ]] || python3 fixtures/gen_crm_export.py "$ROWS" "$CSV" "$DATA/crm-$ROWS.parquet"
start_sandbox --rate weni=1/s
cat > "$DATA/stalled.toml" <<TOML
[input]
phone_column = ["phone", "mobile"]
country_column = "country"
default_region = "BR"
[report]
path = "stalled-report.csv"
[state]
path = "stalled-state.db"
[sinks.chatfuel]
base_url = "$SANDBOX_URL"
automation_id = "62ed0d816e5d77079f07db49"
properties = { source = "crm_import" }
rate = "100000/s"
concurrency = 4
[sinks.weni]
base_url = "$SANDBOX_URL"
name = "{first_name} {last_name}"
rate = "1/s"
concurrency = 1
TOML
rm -f "$DATA"/stalled-state.db*
/usr/bin/time -f "%e %M" -o "$DATA/stalled.time" env CHATFUEL_API_TOKEN=sandbox-token WENI_API_TOKEN=sandbox-token \
  "$BIN" run -q --max-duration 60s --summary-json "$DATA/stalled.json" --config "$DATA/stalled.toml" "$CSV" 2> "$DATA/stalled.stderr" || true
read -r secs kb < <(tail -n 1 "$DATA/stalled.time")
python3 - "$DATA/stalled.json" "$secs" "$kb" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
secs, kb = float(sys.argv[2]), int(sys.argv[3])
u = s["unique_phones"]
target = 64 * 1024 * 1024 + 32 * u
print(f"(e) weni stalled: {s['input_rows']} rows, {u} unique phones, wall {secs:.1f}s; chatfuel {s['statuses']['chatfuel']}, "
      f"weni {s['statuses']['weni']}; peak RSS {kb / 1024:.1f} MB (target {target / 1024 / 1024:.1f} MB)")
PY
stop_sandbox
}

if [[ "${ONLY:-}" == lanes ]]; then lanes; stalled; exit 0; fi
if [[ "${ONLY:-}" == lanes-rate ]]; then lanes; exit 0; fi
unique_phones "$RATE_ROWS" "$DATA/rate.csv"

# (a) rate accuracy
start_sandbox --rate cloudhumans=60/s
cat > "$DATA/rate.toml" <<TOML
[input]
phone_column = "phone"
default_region = "BR"
[report]
path = "rate-report.csv"
[sinks.cloudhumans]
base_url = "$SANDBOX_URL"
account_id = "1"
inbox_id = "2"
template_name = "welcome_v2"
params = { name = "{first_name}" }
rate = "50/s"
concurrency = 4
TOML
CLOUDHUMANS_API_TOKEN=sandbox-token "$BIN" run -q --config "$DATA/rate.toml" "$DATA/rate.csv" 2> "$DATA/rate.stderr" || true
python3 - "$SANDBOX_URL" <<'PY'
import json, sys, urllib.request
log = json.load(urllib.request.urlopen(sys.argv[1] + "/_sandbox/log"))
t = sorted(m["at_ms"] for m in log["cloudhumans"]["messages"])
n = len(t)
lo, hi = int(n * 0.1), int(n * 0.9) - 1
rate = (hi - lo) / ((t[hi] - t[lo]) / 1000.0)
whole = (n - 1) / ((t[-1] - t[0]) / 1000.0)
throttled = log["stats"].get("cloudhumans", {}).get("throttled", 0)
print(f"(a) cloudhumans rate=50/s, {n} messages: middle-80% rate {rate:.2f}/s "
      f"({(rate / 50 - 1) * 100:+.2f}%), whole run {whole:.2f}/s, 429s: {throttled}")
PY
stop_sandbox
lanes

[[ "${SKIP_CEILING:-}" == 1 ]] && exit 0

# (b) + (c) ceiling and memory: Chatfuel, no rate limit on either side.
CSV="$DATA/crm-$ROWS.csv"
[[ -f "$CSV" ]] || python3 fixtures/gen_crm_export.py "$ROWS" "$CSV" "$DATA/crm-$ROWS.parquet"
start_sandbox
cat > "$DATA/ceiling.toml" <<TOML
[input]
phone_column = ["phone", "mobile"]
country_column = "country"
default_region = "BR"
[report]
path = "ceiling-report.csv"
[sinks.chatfuel]
base_url = "$SANDBOX_URL"
automation_id = "62ed0d816e5d77079f07db49"
properties = { source = "crm_import" }
rate = "100000/s"
concurrency = 4
TOML
/usr/bin/time -f "%e %M" -o "$DATA/ceiling.time" env CHATFUEL_API_TOKEN=sandbox-token \
  "$BIN" run -q --config "$DATA/ceiling.toml" "$CSV" 2> "$DATA/ceiling.stderr" || true
read -r secs kb < <(tail -n 1 "$DATA/ceiling.time")
python3 - "$SANDBOX_URL" "$secs" "$kb" "$ROWS" <<'PY'
import json, sys, urllib.request
log = json.load(urllib.request.urlopen(sys.argv[1] + "/_sandbox/log"))
secs, kb, rows = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reqs = len(log["chatfuel"]["requests"])
phones = sum(len(r["phones"]) for r in log["chatfuel"]["requests"])
print(f"(b) chatfuel, {rows} input rows, {phones} phones in {reqs} requests, wall {secs:.2f}s: "
      f"{reqs / secs:.0f} requests/s, {phones / secs:.0f} phones/s, {rows / secs:.0f} input rows/s")
print(f"(c) peak RSS of crm-import while sending: {kb / 1024:.0f} MB")
PY
stop_sandbox
stalled
