#!/usr/bin/env bash
# The long fuzzing campaign behind bench/results/fuzz.md, at nice 19 (run it in the background):
# the parser target for PARSER_RUNS inputs, then the full-decoder target for DECODER_CHUNKS runs of
# CHUNK_MINUTES minutes each. Every chunk resumes from the corpus the previous ones grew (in
# LOG_DIR/decoder); restarting bounds the memory that libFuzzer's own bookkeeping accumulates
# (about 30 MB a minute at ~1500 inputs/s, none of it in the decoder).
#   bash fuzz/campaign.sh [LOG_DIR]       # default LOG_DIR: /tmp/lalic-fuzz
#   PARSER_RUNS=0 DECODER_CHUNKS=2 bash fuzz/campaign.sh    # decoder only, 30 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-/tmp/lalic-fuzz}
PARSER_RUNS=${PARSER_RUNS:-5000000}
DECODER_CHUNKS=${DECODER_CHUNKS:-4}
CHUNK_MINUTES=${CHUNK_MINUTES:-15}
PY=${PY:-.venv/bin/python}
mkdir -p "$LOG_DIR/parser" "$LOG_DIR/decoder" "$LOG_DIR/crashes"
date -u +%FT%TZ >> "$LOG_DIR/started"
if [ "$PARSER_RUNS" -gt 0 ]; then
    nice -n 19 "$PY" fuzz/fuzz_decoder.py --target parser --runs "$PARSER_RUNS" --seed 1 \
        --work-dir "$LOG_DIR/parser" --artifacts "$LOG_DIR/crashes" --stats-every 60 \
        > "$LOG_DIR/parser.log" 2>&1 || echo "parser exit $?" >> "$LOG_DIR/parser.log"
fi
for chunk in $(seq 1 "$DECODER_CHUNKS"); do
    nice -n 19 "$PY" fuzz/fuzz_decoder.py --target decoder --seed $((100 + chunk)) \
        --work-dir "$LOG_DIR/decoder" --artifacts "$LOG_DIR/crashes" --stats-every 60 \
        -- -max_total_time=$((CHUNK_MINUTES * 60)) \
        > "$LOG_DIR/decoder-$chunk.log" 2>&1 || echo "decoder exit $?" >> "$LOG_DIR/decoder-$chunk.log"
done
date -u +%FT%TZ >> "$LOG_DIR/finished"
