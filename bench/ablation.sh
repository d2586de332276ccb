#!/usr/bin/env bash
# The ablation ladder of issue 17: the empty filter plus one more piece of inflight's
# per-request work at each rung (bench/empty-filter's features), run beside inflight (setup 2)
# and the empty filter in one alternating `inflight bench`, so each rung's cost is a paired
# difference. Extra arguments go to `inflight bench` (default: 4 rounds of 4 s at c=1 and 50).
#
#   bench/ablation.sh [--markdown ablation.md] [inflight bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
out=target-bench-wasm-ablation
rungs=(
  "1-authority:authority"
  "2-shared-get:authority,shared-get"
  "3-metric:authority,shared-get,metric"
  "4-strip-header:authority,shared-get,metric,strip-header"
  "5-stream-state:authority,shared-get,metric,strip-header,stream-state"
)
variants=()
for rung in "${rungs[@]}"; do
  name=${rung%%:*}
  features=${rung#*:}
  echo "ablation: building rung $name (--features $features)" >&2
  (cd bench/empty-filter && CARGO_TARGET_DIR="../../$out/$name" cargo build --quiet --locked \
    --target wasm32-wasip1 --profile wasm --features "$features")
  variants+=(--variant "$name=$out/$name/wasm32-wasip1/wasm/inflight_bench_empty_filter.wasm")
done
cargo build --quiet --release -p inflight
if [ $# -eq 0 ]; then
  set -- --rounds 4 --duration 4s --concurrency 1,50
fi
exec target/release/inflight bench --setups inflight,empty-wasm "${variants[@]}" "$@"
