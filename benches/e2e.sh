#!/usr/bin/env bash
# End-to-end benchmark of the dry run (read → E.164 → dedup → sinks' checks →
# report) on deterministic 1,000,000-row CRM exports, beside the pandas
# baseline (benches/baseline_pandas.py) measured in the same run.
#
#   benches/e2e.sh                 # ROWS=1000000 RUNS=5 PANDAS_RUNS=3
#   PROFILES=messy RUNS=7 benches/e2e.sh
#   BASE_BIN=/tmp/crm-old benches/e2e.sh   # also an older build, alternated run by run
#   S3=1 benches/e2e.sh            # the same files served by a local S3 server
#                                  # (examples/s3_server.rs: s3s + s3s-fs), read as s3:// URLs
#
# Profiles (fixtures/gen_crm_export.py --profile): `br` (70% Brazilian) and
# `messy` (9 countries, 30% without a country, every notation of issue 11).
# Sink configurations: `three` = fixtures/bench.toml (all three sinks with
# templates), `one` = fixtures/bench-one.toml (Chatfuel alone).
# Then, per profile: pandas, and the cross-check of both reports
# (benches/compare_reports.py); and for `messy` the peak RSS growth per extra
# unique phone between 100k and 1M rows.
#
# Needs: python3 with phonenumbers==9.0.33, pandas, pyarrow (pip install ...),
# and /usr/bin/time (GNU time) for peak RSS. Prints Markdown tables of medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
RUNS=${RUNS:-5}
PANDAS_RUNS=${PANDAS_RUNS:-3}
PROFILES=${PROFILES:-br messy}
DATA=bench-data
mkdir -p "$DATA"
python3 -c "import phonenumbers, sys; sys.exit(phonenumbers.__version__ != '9.0.33')" ||
  { echo "benches/e2e.sh: needs Python phonenumbers==9.0.33 (the Rust crate's metadata version)" >&2; exit 1; }
cargo build --release --quiet
BIN=target/release/crm-import

# data PROFILE ROWS → generates the CSV and Parquet once; prints the CSV path.
data() {
  local name=crm-$2.csv
  [[ $1 == br ]] || name=crm-$1-$2.csv
  if [[ ! -f "$DATA/$name" ]]; then
    python3 fixtures/gen_crm_export.py --profile "$1" "$2" "$DATA/$name" "$DATA/${name%.csv}.parquet"
  fi
  echo "$DATA/$name"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rate() { awk -v r="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", r / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
config_of() { case $1 in three) echo fixtures/bench.toml ;; one) echo fixtures/bench-one.toml ;; esac; }
# timed TAG CMD... → appends "TAG seconds kb" to $DATA/e2e-times.txt
timed() {
  local tag=$1; shift
  /usr/bin/time -f "%e %M" -o "$DATA/time.txt" "$@" >/dev/null 2>"$DATA/stderr.txt"
  echo "$tag $(cat "$DATA/time.txt")" >> "$DATA/e2e-times.txt"
}
med_of() { grep "^$1 " "$DATA/e2e-times.txt" | awk '{print $2}' | median; }
rss_of() { grep "^$1 " "$DATA/e2e-times.txt" | awk '{print $3}' | sort -g | tail -1; }

if [[ "${S3:-}" != 1 ]]; then
rm -f "$DATA/e2e-times.txt"
BINS="new"; [[ -n "${BASE_BIN:-}" ]] && BINS="new base"
for profile in $PROFILES; do
  csv=$(data "$profile" "$ROWS")
  # Runs alternate binaries and configurations, so that ratios are side by side;
  # the pandas runs are spread among them (after rounds RUNS/PANDAS_RUNS apart),
  # so that the VM's slow and fast phases of a few minutes hit both alike.
  for round in $(seq "$RUNS"); do
    # The builds swap places every round: a run can pay for the writeback of
    # the report the run before it wrote, and the first of a round follows pandas.
    order=$BINS
    [[ -n "${BASE_BIN:-}" ]] && (( round % 2 == 0 )) && order="base new"
    for which in $order; do
      bin=$BIN; [[ $which == base ]] && bin=$BASE_BIN
      for sinks in three one; do
        timed "$which-$profile-$sinks-csv" "$bin" run -q --config "$(config_of $sinks)" --dry-run \
          --report "$DATA/report-$which-$profile-$sinks.csv" "$csv"
      done
      timed "$which-$profile-three-parquet" "$bin" run -q --config fixtures/bench.toml --dry-run \
        --report "$DATA/report-$which-$profile-parquet.csv" "${csv%.csv}.parquet"
    done
    if (( round * PANDAS_RUNS / RUNS > (round - 1) * PANDAS_RUNS / RUNS )); then
      timed "pandas-$profile" python3 benches/baseline_pandas.py "$csv" "$DATA/report-pandas-$profile.csv"
    fi
  done
done

for profile in $PROFILES; do
  pd=$(med_of "pandas-$profile")
  echo
  echo "Profile \`$profile\`, $ROWS rows, medians of $RUNS (pandas: $PANDAS_RUNS):"
  echo
  echo "| run | wall s | rows/s | peak RSS MB | vs pandas |${BASE_BIN:+ vs base |}"
  echo "|---|---|---|---|---|${BASE_BIN:+---|}"
  for which in $BINS; do
    for what in three-csv one-csv three-parquet; do
      s=$(med_of "$which-$profile-$what"); kb=$(rss_of "$which-$profile-$what")
      vs_base=""
      [[ -n "${BASE_BIN:-}" ]] && vs_base=" $(ratio "$(med_of "base-$profile-$what")" "$s")× |"
      echo "| $which, $what | $s | $(rate "$s") | $((kb / 1024)) | $(ratio "$pd" "$s")× |$vs_base"
    done
  done
  echo "| pandas + phonenumbers, three sinks, CSV | $pd | $(rate "$pd") | $(( $(rss_of "pandas-$profile") / 1024 )) | 1.00× |${BASE_BIN:+ |}"
  echo
  python3 benches/compare_reports.py "$DATA/report-new-$profile-three.csv" "$DATA/report-pandas-$profile.csv" | head -3
done

# Memory: peak RSS growth per extra unique phone, 100k vs $ROWS rows (messy, three sinks).
if [[ " $PROFILES " == *" messy "* ]]; then
  small=$(data messy 100000); big=$(data messy "$ROWS")
  rm -f "$DATA/e2e-growth.txt"
  for _ in $(seq "$RUNS"); do
    for which in $BINS; do
      bin=$BIN; [[ $which == base ]] && bin=$BASE_BIN
      for input in "$small" "$big"; do
        /usr/bin/time -f "%e %M" -o "$DATA/time.txt" "$bin" run -q --config fixtures/bench.toml --dry-run \
          --report "$DATA/report-growth.csv" --summary-json "$DATA/growth.json" "$input" >/dev/null 2>&1
        unique=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['unique_phones'])" "$DATA/growth.json")
        echo "$which-growth-$(basename "$input") $(awk '{print $2}' "$DATA/time.txt") $unique" >> "$DATA/e2e-growth.txt"
      done
    done
  done
  echo
  echo "| build | peak RSS 100k rows MB | peak RSS $ROWS rows MB | extra unique phones | bytes per extra unique phone |"
  echo "|---|---|---|---|---|"
  for which in $BINS; do
    small_kb=$(grep "^$which-growth-$(basename "$small") " "$DATA/e2e-growth.txt" | awk '{print $2}' | median)
    big_kb=$(grep "^$which-growth-$(basename "$big") " "$DATA/e2e-growth.txt" | awk '{print $2}' | median)
    small_u=$(grep "^$which-growth-$(basename "$small") " "$DATA/e2e-growth.txt" | head -1 | awk '{print $3}')
    big_u=$(grep "^$which-growth-$(basename "$big") " "$DATA/e2e-growth.txt" | head -1 | awk '{print $3}')
    echo "| $which | $((small_kb / 1024)) | $((big_kb / 1024)) | $((big_u - small_u)) | $(awk -v a="$small_kb" -v b="$big_kb" -v u=$((big_u - small_u)) 'BEGIN{printf "%.1f", (b - a) * 1024 / u}') |"
  done
  rm -f "$DATA/e2e-growth.txt"
fi
exit 0
fi

CSV=$(data br "$ROWS")
PARQUET=${CSV%.csv}.parquet
if [[ "${S3:-}" == 1 ]]; then
  cargo build --release --quiet --example s3_server
  rm -rf "$DATA/s3"; mkdir -p "$DATA/s3"
  target/release/examples/s3_server "$DATA/s3" bench-access bench-secret \
    "crm/export.csv=$CSV" "crm/export.parquet=$PARQUET" > "$DATA/s3.out" &
  S3_PID=$!
  trap 'kill $S3_PID 2>/dev/null || true' EXIT
  for _ in $(seq 600); do S3_URL=$(sed -n 's/listening on //p' "$DATA/s3.out"); [[ -n "$S3_URL" ]] && break; sleep 0.1; done
  export AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 \
    AWS_ENDPOINT_URL="$S3_URL" AWS_ALLOW_HTTP=true
  # Local and S3 runs alternate, so that the ratio is side by side.
  for _ in $(seq "$RUNS"); do
    for what in local-csv s3-csv local-parquet s3-parquet; do
      case $what in
        local-csv) input=$CSV ;; s3-csv) input=s3://crm/export.csv ;;
        local-parquet) input=$PARQUET ;; s3-parquet) input=s3://crm/export.parquet ;;
      esac
      /usr/bin/time -f "%e" -o "$DATA/time.txt" env RUST_LOG=crm_import=debug "$BIN" run -q \
        --config fixtures/bench.toml --dry-run --report "$DATA/report-$what.csv" "$input" 2> "$DATA/$what.stderr" >/dev/null
      echo "$what $(cat "$DATA/time.txt")" >> "$DATA/s3-times.txt"
    done
  done
  med() { grep "^$1 " "$DATA/s3-times.txt" | awk '{print $2}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  echo "| input ($ROWS rows, medians of $RUNS, alternated) | wall s | rows/s | vs local |"
  echo "|---|---|---|---|"
  for kind in csv parquet; do
    l=$(med "local-$kind"); r=$(med "s3-$kind")
    echo "| local $kind | $l | $(awk -v n="$ROWS" -v s="$l" 'BEGIN{printf "%.0f", n/s}') | 1.00 |"
    echo "| s3:// $kind | $r | $(awk -v n="$ROWS" -v s="$r" 'BEGIN{printf "%.0f", n/s}') | $(awk -v a="$l" -v b="$r" 'BEGIN{printf "%.2f", a/b}') |"
  done
  grep -h "fetched" "$DATA/s3-parquet.stderr" | tail -1
  rm -f "$DATA/s3-times.txt"
  exit 0
fi
