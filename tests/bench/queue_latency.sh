#!/usr/bin/env bash
# How long a generation takes from POST to done, with the studio idle and while a style
# training runs (the work queue pauses long tasks while generations wait or run).
# Usage: tests/bench/queue_latency.sh [path/to/atelier]   (default target/release/atelier)
# Needs curl and jq. Starts its own server on 127.0.0.1:3177 with a scratch data folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/atelier}
PORT=3177
URL=http://127.0.0.1:$PORT
DATA=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
"$BIN" style-data --style pastel --out "$DATA/set" --count 12 >/dev/null
"$BIN" serve --addr 127.0.0.1:$PORT --data-dir "$DATA/studio" >"$DATA/server.log" 2>&1 &
SERVER=$!
until curl -sf "$URL/api/health" >/dev/null; do sleep 0.2; done

# Seconds from POST /api/generate to its done state (20 steps, the model's native size).
generate() {
  local t0 id
  t0=$(date +%s.%N)
  id=$(curl -sf -X POST "$URL/api/generate" -H 'content-type: application/json' \
    -d '{"prompt":"a red circle on a blue background","steps":20,"seed":1}' | jq -r .job_id)
  until [ "$(curl -sf "$URL/api/jobs/$id" | jq -r .state)" = done ]; do sleep 0.02; done
  printf "%.2f\n" "$(echo "$(date +%s.%N) - $t0" | bc)"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

generate >/dev/null # warm-up
idle=$(for _ in 1 2 3 4 5; do generate; done | median)

files=()
for f in "$DATA"/set/*; do files+=(-F "files=@$f"); done
dataset=$(curl -sf -X POST "$URL/api/style-datasets" "${files[@]}" | jq -r .id)
training=$(curl -sf -X POST "$URL/api/style-trainings" -H 'content-type: application/json' \
  -d "{\"dataset_id\":\"$dataset\",\"name\":\"benchstyle\",\"trigger\":\"pastel\",\"steps\":100000,\"sample_every\":0}" | jq -r .id)
until [ "$(curl -sf "$URL/api/style-trainings/$training" | jq -r .state)" = running ]; do sleep 0.2; done
sleep 2
step0=$(curl -sf "$URL/api/style-trainings/$training" | jq -r .step)
busy=$(for _ in 1 2 3 4 5; do generate; done | median)
step1=$(curl -sf "$URL/api/style-trainings/$training" | jq -r .step)
curl -sf -X POST "$URL/api/style-trainings/$training/stop" >/dev/null

echo "| studio | generation, POST to done (median of 5) |"
echo "|---|---|"
echo "| idle | ${idle} s |"
echo "| style training running (it went from step $step0 to $step1 meanwhile) | ${busy} s |"
