#!/usr/bin/env bash
# Run a calibration screen's grid on several students at once, each grid split over several processes: for a GPU,
# where one process of this small model leaves the device mostly idle. Per seed, the first process trains the
# attacker's and the teacher's stages (and writes the poisoned line); then PARTS processes share the grid's entries
# on the cached stages. Every process is stopped at DEADLINE seconds after the start; whatever finished is in the
# JSON lines.
#
#   PY=.venv/bin/python DATA=../shared/data STAGES=runs/stages RES=runs/screen SEEDS="3 4 5" PARTS=3 \
#       DEADLINE=3600 ARGS="--preset cpu --attack syntactic --target 1" GRID_FILE=experiments/calibration/GRID.json \
#       bash experiments/parallel_screen.sh
#
# GRID_FILE holds one JSON list of experiments/calibrate_w2s.py grid entries; entry i goes to part i mod PARTS, so put
# the entries in the order they matter. Output: RES/seedS_p0.jsonl (the poisoned line), RES/seedS_pK.jsonl (part K),
# RES/seedS_pK.err (their progress and errors). Read a student with experiments/screen_gate.py, its files
# comma-separated.
set -u
PY=${PY:-.venv/bin/python}; DATA=${DATA:-../shared/data}; STAGES=${STAGES:-runs/stages}; RES=${RES:-runs/screen}
SEEDS=${SEEDS:-3}; PARTS=${PARTS:-3}; DEADLINE=${DEADLINE:-3600}; ARGS=${ARGS:-}; DEVICE=${DEVICE:-auto}
: "${GRID_FILE:?set GRID_FILE to a JSON list of grid entries}"
mkdir -p "$RES"
start=$(date +%s)
left() { local n=$(( DEADLINE - ($(date +%s) - start) )); echo $(( n > 1 ? n : 1 )); }  # timeout 0 would mean none

part_grid() {  # the entries of part $1 of $PARTS, as one JSON list
    "$PY" -c 'import json, sys; g = json.load(open(sys.argv[1])); k, n = int(sys.argv[2]), int(sys.argv[3]); print(json.dumps(g[k::n]))' \
        "$GRID_FILE" "$1" "$PARTS"
}

one_seed() {
    local s=$1 k
    # shellcheck disable=SC2086
    timeout "$(left)" "$PY" experiments/calibrate_w2s.py $ARGS --seed "$s" --device "$DEVICE" --data-dir "$DATA" \
        --stages "$STAGES" --grid '[{"defense": "none"}]' > "$RES/seed${s}_p0.jsonl" 2> "$RES/seed${s}_p0.err" || return
    for k in $(seq 0 $((PARTS - 1))); do
        # shellcheck disable=SC2086
        timeout "$(left)" "$PY" experiments/calibrate_w2s.py $ARGS --seed "$s" --device "$DEVICE" --data-dir "$DATA" \
            --stages "$STAGES" --grid "$(part_grid "$k")" > "$RES/seed${s}_p$((k + 1)).jsonl" \
            2> "$RES/seed${s}_p$((k + 1)).err" &
    done
    wait
}

for s in $SEEDS; do one_seed "$s" & done
wait
echo "parallel_screen: done in $(( $(date +%s) - start )) s"
