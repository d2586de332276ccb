#!/usr/bin/env bash
# The compose stack, for real (part of `make test`): builds the local base image and the three
# images, brings envoy/docker-compose.yaml up under a unique project name on free ports with two
# predictor replicas, runs the seed's load (hey, shortened to 10 s) through the gateway container
# and checks, against Prometheus's HTTP API and the gateway's own counters:
#   - every answer is 200 or a documented shed (503 x-inflight-shed): hey's 503s equal the
#     gateway's shed_* counters and hey's 200s its admitted counter;
#   - no predictor replica ever had more than containerConcurrency (10) requests in flight
#     (inflight_predictor_max_in_flight of each replica, scraped by Prometheus), and both served;
#   - `promtool check rules` accepts the PrometheusRule's groups;
#   - the KEDA ScaledObject's query and the prometheus-adapter rule behind the HPA, exactly as
#     shipped (only the revision label set to this stack's), return the demand the gateway
#     exported (its inflight_demand_ms_total, read directly) within the tolerance below;
#   - the shedding alerts fire, and the no-replica alert does not;
#   - `compose down -v` leaves no container, network or volume of the project behind.
# The stack is torn down also when a check fails.
#
# Two changes from what ships, both in the test's own copies: the gateway's plugin config gets
# "bufferDepth": 20, so that 50 clients overload 2 replicas (capacity 20 + 20 waiting: the rest
# is shed, which the alert needs), and the alert rules' `for:` becomes 5s (shipped: 2m–10m).
#
# Needs a running Docker engine and docker-compose (v1) or the compose plugin (v2).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
t_start=$SECONDS
say() { echo "test-compose: $*"; }
fail() {
  echo "test-compose: FAIL: $*" >&2
  exit 1
}

# ---- the engine -------------------------------------------------------------------------------
install_hint="install Docker Engine and Compose (Debian: apt-get install docker.io docker-compose) and start the engine (systemctl start docker, or dockerd &)"
command -v docker >/dev/null 2>&1 || fail "no docker command: this test needs a Docker engine; $install_hint"
docker info >/dev/null 2>&1 || fail "docker info failed: no Docker engine answers; $install_hint"
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  fail "neither 'docker compose' nor docker-compose found; $install_hint"
fi
command -v hey >/dev/null 2>&1 || fail "hey not found: run make setup"
command -v jq >/dev/null 2>&1 || fail "jq not found (Debian: apt-get install jq)"
say "using ${compose_cmd[*]} ($("${compose_cmd[@]}" version --short 2>/dev/null || true)), engine $(docker version -f '{{.Server.Version}}')"

REPLICAS=2
CC=10
REVISION=torchserve
HOST=torchserve.default.example.com
LOAD_SECONDS=10
CLIENTS=50
# Window of the shipped queries, and where in it the load sits (see the demand check).
WINDOW=60
QUERY_AT=50

# ---- images -----------------------------------------------------------------------------------
t=$SECONDS
export BASE_IMAGE
BASE_IMAGE="$(scripts/base-image.sh | tail -1)"
t_base=$((SECONDS - t))
t=$SECONDS
# The predictor `cargo test` built, the filter as the Envoy tests build it (no extra builds).
scripts/compose-context.sh --profile debug --wasm-target-dir target-emu-wasm
t_stage=$((SECONDS - t))

project="inflight-test-$$-$RANDOM"
work="$(mktemp -d)"
chmod 755 "$work"
compose() { "${compose_cmd[@]}" -f envoy/docker-compose.yaml -f "$work/compose.test.yaml" -p "$project" "$@"; }

stack_up=false
hey_pid=""
cleanup() {
  local rc=$?
  [[ -n "$hey_pid" ]] && kill "$hey_pid" 2>/dev/null
  if $stack_up; then
    if ((rc != 0)); then
      say "failed: the stack's state and last logs"
      compose ps || true
      compose logs --tail 30 || true
    fi
    compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The test's copies: plugin config with a buffer that 50 clients overflow; alerts with short `for:`.
sed 's/"readyReplicas": 1,/"readyReplicas": 1, "bufferDepth": 20,/' envoy/envoy.yaml >"$work/envoy.yaml"
grep -q '"bufferDepth": 20' "$work/envoy.yaml" || fail "could not set bufferDepth in the test's copy of envoy/envoy.yaml"
mkdir -p "$work/rules"
sed -E 's/^( *)for: [0-9]+[smh]$/\1for: 5s/' target/compose/prometheus/rules/inflight.yaml >"$work/rules/inflight.yaml"
rules_for="$(grep -c '^ *for: ' target/compose/prometheus/rules/inflight.yaml)"
[[ "$(grep -c '^ *for: 5s$' "$work/rules/inflight.yaml")" == "$rules_for" ]] ||
  fail "could not shorten every for: in the test's copy of the rules"
chmod -R a+rX "$work"
cat >"$work/compose.test.yaml" <<EOF
services:
  gateway:
    volumes:
      - $work/envoy.yaml:/etc/envoy/envoy.yaml:ro
  prometheus:
    volumes:
      - $work/rules:/etc/prometheus/rules:ro
EOF

t=$SECONDS
compose config -q || fail "compose config rejected the files"
compose build >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "building the images failed (log above)"; }
for image in gateway predictor prometheus; do
  docker image inspect "inflight-$image:local" >/dev/null || fail "image inflight-$image:local was not built"
done
t_build=$((SECONDS - t))
say "images: $(for i in gateway predictor prometheus; do printf 'inflight-%s %s  ' "$i" "$(docker image inspect -f '{{.Size}}' "inflight-$i:local" | numfmt --to=si)"; done)(base $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | numfmt --to=si))"

# promtool, from the Prometheus image, on the shipped rules.
docker run --rm --entrypoint promtool inflight-prometheus:local check rules /etc/prometheus/rules/inflight.yaml ||
  fail "promtool check rules rejected manifests/monitoring/prometheusrule.yaml's groups"

# ---- up ---------------------------------------------------------------------------------------
t=$SECONDS
stack_up=true
export INFLIGHT_GATEWAY_PORT="" INFLIGHT_ADMIN_PORT="" INFLIGHT_PROMETHEUS_PORT=""
compose up -d --scale predictor=$REPLICAS >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "compose up failed (log above)"; }
port_of() { compose port "$1" "$2" | tail -1; }
gateway="$(port_of gateway 8080)"
admin="$(port_of gateway 9901)"
prom="$(port_of prometheus 9090)"
[[ -n "$gateway" && -n "$admin" && -n "$prom" ]] || fail "published ports not found (gateway '$gateway', admin '$admin', prometheus '$prom')"
say "project $project: gateway $gateway, admin $admin, prometheus $prom"

# One value of the gateway's own /stats/prometheus (sum over the lines matching name{labels}).
gw_metric() {
  curl -fsS "http://$admin/stats/prometheus" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { printf "%.0f\n", s }'
}
calc() { awk "BEGIN { OFMT = \"%.6f\"; print ($1) }"; } # floating point; comparisons print 1 or 0
prom_query() { # query [time]
  local args=(--data-urlencode "query=$1")
  [[ -n "${2:-}" ]] && args+=(--data-urlencode "time=$2")
  curl -fsS "http://$prom/api/v1/query" "${args[@]}"
}
wait_for() { # seconds description command...
  local limit=$1 deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${limit}s waiting for: $what"
    sleep 0.5
  done
}
ready_replicas_are() { [[ "$(gw_metric "inflight_ready_replicas{revision=\"$REVISION\"}")" == "$1" ]]; }
targets_up() {
  [[ "$(curl -fsS "http://$prom/api/v1/targets?state=active" |
    jq '[.data.activeTargets[] | select(.health == "up")] | length')" == "$1" ]]
}
healthy() { [[ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$1")")" == healthy ]]; }
wait_for 60 "the gateway container's health check to pass" healthy gateway
wait_for 120 "the gateway to learn $REPLICAS ready replicas" ready_replicas_are $REPLICAS
wait_for 60 "Prometheus scraping the gateway and $REPLICAS predictors" targets_up $((REPLICAS + 1))
t_up=$((SECONDS - t))

# ---- load -------------------------------------------------------------------------------------
t=$SECONDS
demand_before="$(gw_metric "inflight_demand_ms_total{revision=\"$REVISION\"}")"
admitted_before="$(gw_metric "inflight_requests_total{revision=\"$REVISION\",outcome=\"admitted\"}")"
shed_before="$(gw_metric "inflight_requests_total{revision=\"$REVISION\",outcome=\"shed_")"
load_start="$(date +%s.%N)"
say "load: hey -m POST -z ${LOAD_SECONDS}s -c $CLIENTS -D predictor/samples/mnist.json through the gateway"
hey -m POST -z "${LOAD_SECONDS}s" -c "$CLIENTS" -D predictor/samples/mnist.json -T application/json \
  -host "$HOST" "http://$gateway/v1/models/mnist:predict" >"$work/hey.txt" &
hey_pid=$!
# While the buffer is full, one more request, to see a shed as a client does (its header).
buffer_full() { (($(gw_metric "inflight_queued{revision=\"$REVISION\"}") >= 20)); }
wait_for 10 "the gateway's buffer (bufferDepth 20) to fill" buffer_full
probe_ok=0 probe_shed=0 shed_header=""
for _ in $(seq 20); do
  curl -s -o /dev/null -D "$work/probe.txt" -X POST -H "Host: $HOST" -H 'content-type: application/json' \
    --data @predictor/samples/mnist.json "http://$gateway/v1/models/mnist:predict"
  case "$(head -1 "$work/probe.txt" | awk '{ print $2 }')" in
    200) probe_ok=$((probe_ok + 1)) ;;
    503) probe_shed=$((probe_shed + 1)) && shed_header="$(tr -d '\r' <"$work/probe.txt" | grep -i '^x-inflight-shed:' || true)" && break ;;
    *) fail "probe during the load: $(head -1 "$work/probe.txt")" ;;
  esac
done
wait "$hey_pid" || fail "hey failed: $(cat "$work/hey.txt")"
hey_pid=""
load_end="$(date +%s.%N)"

# The counters settle once nothing is in flight or queued (the demand integral advances every tick).
idle() {
  [[ "$(gw_metric "inflight_active{revision=\"$REVISION\"}")" == 0 &&
    "$(gw_metric "inflight_queued{revision=\"$REVISION\"}")" == 0 ]]
}
wait_for 30 "the gateway to drain" idle
settled() {
  local a b
  a="$(gw_metric "inflight_demand_ms_total{revision=\"$REVISION\"}")"
  sleep 1.1 # longer than the filter's tick and Envoy's stats flush (1 s)
  b="$(gw_metric "inflight_demand_ms_total{revision=\"$REVISION\"}")"
  [[ "$a" == "$b" ]]
}
wait_for 15 "the demand counter to settle" settled
demand_ms=$(($(gw_metric "inflight_demand_ms_total{revision=\"$REVISION\"}") - demand_before))
admitted=$(($(gw_metric "inflight_requests_total{revision=\"$REVISION\",outcome=\"admitted\"}") - admitted_before))
shed=$(($(gw_metric "inflight_requests_total{revision=\"$REVISION\",outcome=\"shed_") - shed_before))

# Answers: hey's status codes against the gateway's outcome counters.
count_status() { awk -v c="[$1]" '$1 == c { print $2; found = 1 } END { if (!found) print 0 }' "$work/hey.txt"; }
ok=$(($(count_status 200) + probe_ok))
unavailable=$(($(count_status 503) + probe_shed))
others="$(awk '/^Status code distribution:/ { on = 1; next } on && /^ *\[/ { if ($1 != "[200]" && $1 != "[503]") print } on && !/^ *\[/ { on = 0 }' "$work/hey.txt")"
errors="$(sed -n '/^Error distribution:/,$p' "$work/hey.txt")"
say "answers (hey and $((probe_ok + probe_shed)) probes): 200 → $ok, 503 → $unavailable; gateway: admitted $admitted, shed $shed"
[[ -z "$others" ]] || fail "status codes other than 200 and 503: $others"
[[ -z "$errors" ]] || fail "hey saw transport errors: $errors"
((ok > 0)) || fail "no request succeeded"
((unavailable == shed)) || fail "hey got $unavailable 503s but the gateway shed $shed: some 503s were not sheds"
((ok == admitted)) || fail "hey got $ok 200s but the gateway admitted $admitted"
((shed > 0)) || fail "the test's overload (bufferDepth 20, $CLIENTS clients, $REPLICAS replicas) shed nothing"
((probe_shed == 1)) || fail "20 requests sent while the buffer was full were all admitted"
[[ -n "$shed_header" ]] || fail "a 503 during the load had no x-inflight-shed header: $(cat "$work/probe.txt")"
say "a shed as the client sees it: 503, $shed_header (after $probe_ok admitted probes)"

# Replicas: each served, none above containerConcurrency.
max_seen="$(prom_query 'inflight_predictor_max_in_flight' | jq -r '[.data.result[] | .value[1]] | join(" ")')"
say "max in flight seen by each predictor (containerConcurrency $CC): $max_seen"
n=0
for m in $max_seen; do
  n=$((n + 1))
  ((m <= CC)) || fail "a predictor had $m requests in flight, above containerConcurrency $CC"
  ((m >= 1)) || fail "a predictor served nothing (Envoy did not spread over the replicas)"
done
((n == REPLICAS)) || fail "Prometheus has inflight_predictor_max_in_flight of $n predictors, expected $REPLICAS"

# Alerts: shedding fires (rules' `for:` shortened to 5s in the test's copy); no-replica does not.
alert_state() { curl -fsS "http://$prom/api/v1/alerts" | jq -r --arg a "$1" '[.data.alerts[] | select(.labels.alertname == $a) | .state] | first // "inactive"'; }
firing() { [[ "$(alert_state "$1")" == firing ]]; }
wait_for 60 "alert InflightShedding to fire" firing InflightShedding
wait_for 30 "alert InflightSheddingHigh to fire" firing InflightSheddingHigh
[[ "$(alert_state InflightDemandWithoutReplicas)" == inactive ]] || fail "InflightDemandWithoutReplicas is $(alert_state InflightDemandWithoutReplicas) with $REPLICAS ready replicas"
say "alerts: InflightShedding firing, InflightSheddingHigh firing, InflightDemandWithoutReplicas inactive"

# Demand: the shipped queries, evaluated at T = load start + ${QUERY_AT}s, so that their 1m window
# [T-60s, T] holds the whole load with idle scrapes on both sides. What the gateway exported in
# that window is the increase of its counter, demand_ms (read above); the window's average
# concurrency is demand_ms / 60 s / 1000. Prometheus's rate() divides the increase between the
# first and last scrape in the window by their distance and extrapolates to the window's edges,
# so with 5 s scrapes it reads between 1× and 60/50 = 1.2× that average: accepted within
# [0.95, 1.25] × expected.
keda_query="$(sed -n 's/^ *query: //p' manifests/autoscaling/keda/scaledobject.yaml)"
adapter_template="$(sed -n 's/^ *metricsQuery: //p' manifests/autoscaling/hpa/prometheus-adapter-values.yaml)"
series_query="$(sed -n "s/^ *- seriesQuery: '\(.*\)'$/\1/p" manifests/autoscaling/hpa/prometheus-adapter-values.yaml)"
keda_query="${keda_query//revision=\"torchserve-raw\"/revision=\"$REVISION\"}"
# prometheus-adapter renders <<.Series>> and <<.LabelMatchers>> from the HPA's metric selector.
hpa_query="${adapter_template//<<.Series>>/inflight_demand_ms_total}"
hpa_query="${hpa_query//<<.LabelMatchers>>/revision=\"$REVISION\"}"
[[ "$keda_query" == *"revision=\"$REVISION\""* ]] || fail "KEDA query not found or not per revision: '$keda_query'"
[[ "$hpa_query" == *"revision=\"$REVISION\""* && "$hpa_query" != *"<<"* ]] || fail "adapter query not rendered: '$hpa_query'"
at="$(calc "$load_start + $QUERY_AT")"
wait_until_past() { [[ "$(calc "$(date +%s.%N) > $1")" == 1 ]]; }
wait_for $((QUERY_AT + 30)) "T = load start + ${QUERY_AT}s (plus one scrape)" wait_until_past "$(calc "$at + 6")"
expected="$(calc "$demand_ms / $WINDOW / 1000")"
load_avg="$(calc "$demand_ms / ($load_end - $load_start) / 1000")"
value_of() { prom_query "$1" "$at" | jq -r '.data.result | if length == 1 then .[0].value[1] else "results: \(length)" end'; }
keda="$(value_of "$keda_query")"
hpa="$(value_of "$hpa_query")"
series="$(curl -fsS "http://$prom/api/v1/series" --data-urlencode "match[]=$series_query" | jq '.data | length')"
say "gateway demand: ${demand_ms} request-ms in the window = $expected average over ${WINDOW}s ($load_avg during the ${LOAD_SECONDS}s load)"
say "KEDA query      $keda_query = $keda"
say "HPA adapter     $hpa_query = $hpa (series matching '$series_query': $series)"
within() { [[ "$(calc "$1 >= 0.95 * $2 && $1 <= 1.25 * $2")" == 1 ]]; }
[[ "$keda" =~ ^[0-9.]+$ ]] && within "$keda" "$expected" || fail "KEDA query returned $keda, expected $expected (tolerance 0.95–1.25×)"
[[ "$hpa" =~ ^[0-9.]+$ ]] && within "$hpa" "$expected" || fail "HPA adapter query returned $hpa, expected $expected (tolerance 0.95–1.25×)"
((series >= 1)) || fail "the adapter's seriesQuery matches no series"
say "ratios to the exported demand: KEDA $(calc "$keda / $expected"), HPA adapter $(calc "$hpa / $expected")"
t_load=$((SECONDS - t))

# ---- down -------------------------------------------------------------------------------------
t=$SECONDS
volumes="$(docker ps -aq --filter "label=com.docker.compose.project=$project" |
  xargs -r docker inspect -f '{{range .Mounts}}{{if .Name}}{{.Name}} {{end}}{{end}}' | tr -s ' \n' ' ')"
compose down -v --remove-orphans -t 5 >/dev/null 2>&1
stack_up=false
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
[[ -z "$left" ]] || fail "containers left after down: $left"
left="$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
[[ -z "$left" ]] || fail "networks left after down: $left"
left="$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
for v in $volumes; do docker volume inspect "$v" >/dev/null 2>&1 && left+=" $v"; done
[[ -z "${left// /}" ]] || fail "volumes left after down: $left"
[[ -n "$volumes" ]] || fail "the stack had no volume (Prometheus's data volume expected)"
t_down=$((SECONDS - t))
say "down: no container, network or volume ($volumes) left"

say "passed in $((SECONDS - t_start)) s (base image ${t_base} s, build and stage ${t_stage} s, images ${t_build} s, up ${t_up} s, load and checks ${t_load} s, down ${t_down} s)"
