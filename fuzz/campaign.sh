#!/usr/bin/env bash
# The long fuzzing campaign behind bench/results/fuzz.md: the parser target for PARSER_RUNS inputs,
# then the full-decoder target for DECODER_MINUTES minutes, both at nice 19 (a background job).
#   bash fuzz/campaign.sh [LOG_DIR]      # logs and new corpus entries go to LOG_DIR (default /tmp/lalic-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-/tmp/lalic-fuzz}
PARSER_RUNS=${PARSER_RUNS:-5000000}
DECODER_MINUTES=${DECODER_MINUTES:-60}
PY=${PY:-.venv/bin/python}
mkdir -p "$LOG_DIR/parser" "$LOG_DIR/decoder" "$LOG_DIR/crashes"
date -u +%FT%TZ > "$LOG_DIR/started"
nice -n 19 "$PY" fuzz/fuzz_decoder.py --target parser --runs "$PARSER_RUNS" --seed 1 \
    --work-dir "$LOG_DIR/parser" --artifacts "$LOG_DIR/crashes" --stats-every 60 \
    > "$LOG_DIR/parser.log" 2>&1 || echo "parser exit $?" >> "$LOG_DIR/parser.log"
nice -n 19 "$PY" fuzz/fuzz_decoder.py --target decoder --seed 2 \
    --work-dir "$LOG_DIR/decoder" --artifacts "$LOG_DIR/crashes" --stats-every 60 \
    -- -max_total_time=$((DECODER_MINUTES * 60)) \
    > "$LOG_DIR/decoder.log" 2>&1 || echo "decoder exit $?" >> "$LOG_DIR/decoder.log"
date -u +%FT%TZ > "$LOG_DIR/finished"
