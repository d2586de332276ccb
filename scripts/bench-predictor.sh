#!/usr/bin/env bash
# Benchmark of inflight-predictor, one run, side by side, on this machine, with `hey` as load:
#   1. inflight-predictor (default flags) and with dynamic batching off,
#   2. KServe's Python model server serving the same TorchScript file
#      (predictor/bench/kserve_digits.py), same request (predictor/samples/mnist.json),
#   3. raw in-process tch inference (cargo bench --bench raw_inference), the upper bound.
# Prints a markdown table of requests/s, p50 and p99 per concurrency level, then the ratios.
# A benchmark, not a test: it asserts nothing but that every request got 200.
#
# Needs: hey (apt-get install hey); libtorch (scripts/setup-torch.sh, run here); a python with
# kserve, torch and pillow, given as KSERVE_PYTHON (default: python3), e.g.
#   python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install torch==2.13.0 kserve pillow
#   KSERVE_PYTHON=/tmp/bench-venv/bin/python scripts/bench-predictor.sh
# Knobs (env): DURATION per measurement (10s), LEVELS of concurrency ("1 10 50"),
# PREDICTOR_ARGS extra flags for the predictor.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10s}"
LEVELS="${LEVELS:-1 10 50}"
PREDICTOR_ARGS="${PREDICTOR_ARGS:-}"
KSERVE_PYTHON="${KSERVE_PYTHON:-python3}"
sample="$repo/predictor/samples/mnist.json"
model_dir="$repo/predictor/model/mnist"

command -v hey >/dev/null || { echo "bench: hey is missing: apt-get install hey" >&2; exit 1; }
"$KSERVE_PYTHON" -c 'import kserve, torch, PIL' 2>/dev/null || {
  echo "bench: $KSERVE_PYTHON cannot import kserve, torch and PIL; see the header of $0" >&2
  exit 1
}

"$repo/scripts/setup-torch.sh" >/dev/null
LIBTORCH="$("$repo/scripts/setup-torch.sh" --print-libtorch | tail -1)"
export LIBTORCH
target="${CARGO_TARGET_DIR:-$repo/target}"
echo "bench: building (release)" >&2
(cd "$repo" && cargo build --release -q -p inflight-predictor --bin inflight-predictor \
  && cargo bench -q -p inflight-predictor --bench raw_inference --no-run 2>/dev/null)
predictor="$target/release/inflight-predictor"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_ok() { # url: until it answers 200 (60 s at most)
  for _ in $(seq 600); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" == 200 ]]; then return 0; fi
    sleep 0.1
  done
  echo "bench: $1 never became ready" >&2
  return 1
}

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
tick="$(getconf CLK_TCK)"

# hey's summary → "rps p50_ms p99_ms server_cpu_us_per_request"; fails if any answer was not 200.
# The CPU column is the server process's own CPU time per answered request: unlike requests/s
# it does not move when other processes share the machine.
measure() { # url concurrency server_pid
  local out="$work/hey.txt"
  hey -z 2s -c "$2" -m POST -T application/json -D "$sample" "$1" >/dev/null # warm-up
  local before after
  before="$(cpu_ticks "$3")"
  hey -z "$DURATION" -c "$2" -m POST -T application/json -D "$sample" "$1" >"$out"
  after="$(cpu_ticks "$3")"
  if grep -E '^\s+\[[0-9]+\]' "$out" | grep -vqE '^\s+\[200\]' || grep -q 'Error distribution' "$out"; then
    echo "bench: non-200 answers from $1:" >&2
    cat "$out" >&2
    return 1
  fi
  awk -v cpu="$((after - before))" -v tick="$tick" \
    '/Requests\/sec:/ {rps=$2}
     /^ +50%+ in/ {p50=sprintf("%.2f", $3*1000)}
     /^ +99%+ in/ {p99=sprintf("%.2f", $3*1000)}
     /^ +\[200\]/ {n=$2}
     END {if (p50 == "") p50 = "nan"; if (p99 == "") p99 = "nan";
          printf "%.0f %s %s %.0f\n", rps, p50, p99, (n > 0 ? 1e6 * cpu / tick / n : 0)}' "$out"
}

declare -A rps p50 p99 cpu
run_levels() { # name url server_pid
  for c in $LEVELS; do
    read -r r a b u < <(measure "$2" "$c" "$3")
    rps["$1,$c"]=$r p50["$1,$c"]=$a p99["$1,$c"]=$b cpu["$1,$c"]=$u
    echo "bench: $1 c=$c: $r req/s, p50 $a ms, p99 $b ms, $u us CPU per request" >&2
  done
}

start_predictor() { # name, extra flags...
  local name="$1"
  shift
  # shellcheck disable=SC2086
  "$predictor" --host 127.0.0.1 --port 0 --model-dir "$model_dir" $PREDICTOR_ARGS "$@" \
    >"$work/predictor.out" 2>"$work/predictor.err" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q '^listening on' "$work/predictor.out" && break; sleep 0.1; done
  local addr
  addr="$(sed -n 's/^listening on //p' "$work/predictor.out")"
  wait_ok "http://$addr/v2/health/ready"
  run_levels "$name" "http://$addr/v1/models/mnist:predict" "$pid"
  kill "$pid"
  wait "$pid" || true
}

load_before="$(cut -d" " -f1-3 /proc/loadavg)"
start_predictor predictor
start_predictor predictor_nobatch --max-batch-size 1

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$KSERVE_PYTHON" "$repo/predictor/bench/kserve_digits.py" --model_dir "$model_dir" \
  --model_name mnist --http_port "$port" >"$work/kserve.log" 2>&1 &
kserve_pid=$!
pids+=("$kserve_pid")
wait_ok "http://127.0.0.1:$port/v1/models/mnist"
answer="$(curl -s -X POST -H 'content-type: application/json' -d @"$sample" "http://127.0.0.1:$port/v1/models/mnist:predict")"
[[ "$answer" == '{"predictions":[2]}' ]] || { echo "bench: KServe answered $answer" >&2; exit 1; }
run_levels kserve "http://127.0.0.1:$port/v1/models/mnist:predict" "$kserve_pid"
kill "$kserve_pid"
wait "$kserve_pid" || true

raw() { # batch → "images/s cpu_us_per_image"
  (cd "$repo" && cargo bench -q -p inflight-predictor --bench raw_inference -- \
    --workers 1 --threads 1 --batch "$1" --seconds 5 --model-dir "$model_dir" 2>/dev/null) |
    sed -n 's/.*: \([0-9]*\) images\/s.*, \([0-9.]*\) cpu_us per image/\1 \2/p'
}
read -r raw1 rawcpu1 < <(raw 1)
read -r rawbatch rawcpubatch < <(raw 32)

echo
echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')); hey -z $DURATION per level, after a 2 s warm-up; request: predictor/samples/mnist.json (one 28x28 PNG); load average before the run: $load_before, after: $(cut -d" " -f1-3 /proc/loadavg) (the machine may be shared)."
echo
echo "| server | concurrency | requests/s | p50 ms | p99 ms | server CPU per request |"
echo "|---|---:|---:|---:|---:|---:|"
for name in predictor predictor_nobatch kserve; do
  case "$name" in
    predictor) label="inflight-predictor (defaults: batching on)" ;;
    predictor_nobatch) label="inflight-predictor --max-batch-size 1" ;;
    kserve) label="KServe 0.21 Python server" ;;
  esac
  for c in $LEVELS; do
    echo "| $label | $c | ${rps[$name,$c]} | ${p50[$name,$c]} | ${p99[$name,$c]} | ${cpu[$name,$c]} µs |"
  done
done
echo
echo "Raw in-process tch inference (1 worker, 1 intra-op thread, no HTTP): batch 1: $raw1 images/s, $rawcpu1 µs CPU per image; batch 32 (the default --max-batch-size): $rawbatch images/s, $rawcpubatch µs CPU per image."
echo
echo "| concurrency | predictor / KServe, requests/s | KServe / predictor, CPU per request | predictor / raw batch-1, requests/s | raw batch-1 / predictor, CPU per image | batching on / off, requests/s |"
echo "|---:|---:|---:|---:|---:|---:|"
for c in $LEVELS; do
  awk -v p="${rps[predictor,$c]}" -v k="${rps[kserve,$c]}" -v r="$raw1" \
    -v pc="${cpu[predictor,$c]}" -v kc="${cpu[kserve,$c]}" -v rc="$rawcpu1" \
    -v n="${rps[predictor_nobatch,$c]}" -v c="$c" \
    'BEGIN {printf "| %s | %.1fx | %.1fx | %.0f %% | %.0f %% | %.2fx |\n", c, p/k, kc/pc, 100*p/r, 100*rc/pc, p/n}'
done
