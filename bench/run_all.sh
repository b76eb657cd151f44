#!/usr/bin/env bash
# Every scenario of BENCHMARKS.md's issue 26 table, one after the other on this machine, in
# one run: each writes its JSON report (and the firehose its lag CSV) into OUT, and its
# table to OUT/<name>.txt. Run it alone: on 2 CPUs anything beside it shows in the ratios.
#
#   bench/run_all.sh [OUT]            (default bench-results/<date>)
#   BIG=1 bench/run_all.sh            also the 10M-row backfill (seeding alone takes long)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results/$(date -u +%Y%m%dT%H%M)}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}

run() {
    local name=$1
    shift
    echo "[run_all $(date -u +%H:%M:%S)] $name: $*" >&2
    "$py" "$@" --json >"$out/$name.json" 2>"$out/$name.txt"
}

# The month-end close (200k-row insert and update transactions, then a marker).
run close-pk bench/cdc_bulk.py --no-indexes --ways native,live,cold --repeat 2
run close-indexes bench/cdc_bulk.py --ways native,live,cold
run close-analyze bench/cdc_bulk.py --no-indexes --ways live --analyze-every 0.3
# Small transactions: the firehose (8 clients, 40 + 10 lines), Odoo invoicing (4 clients).
run firehose bench/cdc_oltp.py --firehose --no-indexes --csv "$out/firehose.csv"
run oltp bench/cdc_oltp.py --seconds 30
# The apply ceiling: 1M row changes in small transactions, applied cold.
run backlog-pk bench/cdc_oltp.py --backlog 1000000 --no-indexes
run backlog-indexes bench/cdc_oltp.py --backlog 1000000
# The initial copy: raw pipe, native, the replicator both ways, pgcopydb.
run backfill-1m bench/backfill.py --rows 1000000 --repeat 3
if [ "${BIG:-0}" = 1 ]; then
    run backfill-10m bench/backfill.py --rows 10000000 --repeat 1 \
        --ways raw,replicator,replicator-indexes,pgcopydb
fi
# The decoder alone, against the reference decoder (pytest-benchmark).
echo "[run_all $(date -u +%H:%M:%S)] decoder" >&2
"$py" -m pytest -q -p no:cacheprovider bench/test_decoder_bench.py --benchmark-only >"$out/decoder.txt" 2>&1
echo "[run_all $(date -u +%H:%M:%S)] done: $out" >&2
