#!/usr/bin/env bash
# End-to-end benchmark of the dry run (read → E.164 → dedup → report) on a
# deterministic 1,000,000-row messy CRM export, as CSV and as Parquet, beside
# the pandas baseline (benches/baseline_pandas.py) measured in the same run.
#
#   benches/e2e.sh            # ROWS=1000000 RUNS=5 PANDAS_RUNS=3 by default
#   ROWS=200000 RUNS=3 benches/e2e.sh
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
