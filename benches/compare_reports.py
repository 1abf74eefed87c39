#!/usr/bin/env python3
"""Correctness cross-check: crm-import's dry-run report against the pandas baseline's.

    python3 benches/compare_reports.py CRM_REPORT.csv PANDAS_REPORT.csv

Joins the two reports on (row, sink) and counts rows whose status or E.164
differs, or that one report has and the other lacks. Prints the count and the
first 10 differences; exits 1 if there is any.
"""
import csv
import sys


def load(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["row"], r["sink"]): (r["status"], r["phone_e164"]) for r in csv.DictReader(f)}


def main():
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    keys = ours.keys() | theirs.keys()
    diffs = [(k, ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)]
    print(f"cross-check: {len(ours)} crm-import rows, {len(theirs)} pandas rows, "
          f"{len(diffs)} differences")
    for k, a, b in sorted(diffs)[:10]:
        print(f"  row {k[0]} sink {k[1] or '(record)'}: crm-import {a}, pandas {b}")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
