#!/usr/bin/env bash
# End-to-end benchmark of the dry run (read → E.164 → dedup → report) on a
# deterministic 1,000,000-row messy CRM export, as CSV and as Parquet, beside
# the pandas baseline (benches/baseline_pandas.py) measured in the same run.
#
#   benches/e2e.sh            # ROWS=1000000 RUNS=5 PANDAS_RUNS=3 by default
#   ROWS=200000 RUNS=3 benches/e2e.sh
#   S3=1 benches/e2e.sh       # also the same files served by a local S3 server
#                             # (examples/s3_server.rs: s3s + s3s-fs), read as s3:// URLs
#
# Needs: python3 with phonenumbers==9.0.33, pandas, pyarrow (pip install ...),
# and /usr/bin/time (GNU time) for peak RSS. Prints a Markdown table of medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-1000000}
RUNS=${RUNS:-5}
PANDAS_RUNS=${PANDAS_RUNS:-3}
DATA=bench-data
mkdir -p "$DATA"
CSV="$DATA/crm-$ROWS.csv"
PARQUET="$DATA/crm-$ROWS.parquet"
if [[ ! -f "$CSV" || ! -f "$PARQUET" ]]; then
  python3 fixtures/gen_crm_export.py "$ROWS" "$CSV" "$PARQUET"
fi
cargo build --release --quiet
BIN=target/release/crm-import

# run_median LABEL RUNS CMD... → "median_seconds max_rss_kb"
run_median() {
  local runs=$1; shift
  local times=() rss=0
  for _ in $(seq "$runs"); do
    /usr/bin/time -f "%e %M" -o "$DATA/time.txt" "$@" >/dev/null 2>"$DATA/stderr.txt"
    read -r t m < "$DATA/time.txt"
    times+=("$t")
    (( m > rss )) && rss=$m
  done
  local median
  median=$(printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "$median $rss"
}

read -r csv_s csv_kb < <(run_median "$RUNS" "$BIN" run -q --config fixtures/bench.toml --dry-run --report "$DATA/report-csv.csv" "$CSV")
read -r pq_s pq_kb < <(run_median "$RUNS" "$BIN" run -q --config fixtures/bench.toml --dry-run --report "$DATA/report-parquet.csv" "$PARQUET")
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
read -r pd_s pd_kb < <(run_median "$PANDAS_RUNS" python3 benches/baseline_pandas.py "$CSV" "$DATA/report-pandas.csv")

rate() { awk -v r="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", r / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
echo "| run ($ROWS rows, medians) | wall s | rows/s | peak RSS MB | vs pandas |"
echo "|---|---|---|---|---|"
echo "| crm-import --dry-run, CSV | $csv_s | $(rate "$csv_s") | $((csv_kb / 1024)) | $(ratio "$pd_s" "$csv_s")× faster |"
echo "| crm-import --dry-run, Parquet | $pq_s | $(rate "$pq_s") | $((pq_kb / 1024)) | $(ratio "$pd_s" "$pq_s")× faster |"
echo "| pandas + phonenumbers baseline, CSV | $pd_s | $(rate "$pd_s") | $((pd_kb / 1024)) | 1.0× |"
echo
echo "Report rows: crm-import $(($(wc -l < "$DATA/report-csv.csv") - 1)), pandas $(($(wc -l < "$DATA/report-pandas.csv") - 1))"
