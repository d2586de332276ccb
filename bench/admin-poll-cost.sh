#!/usr/bin/env bash
# Cost of the filter's admin poll (endpoint discovery) in an Istio-sized gateway: two Envoys with
# the same 1,000 clusters x 10 endpoints (--clusters, --endpoints), one with Istio's stats config,
# one keeping every stat, and these requests interleaved in rounds (order rotated each round):
#   ready        GET /ready                                        baseline: HTTP handling alone
#   stats        GET /stats?format=json&filter=membership_healthy  today's poll
#   clusters-1   GET /clusters?filter=^(one RE2-escaped name)$      the planned poll, 1 revision
#   clusters-10  the same with 10 names                            the planned poll, 10 revisions
#   clusters-0   GET /clusters?filter=^(a name no cluster has)$     the filter's pass alone
#   json-10      GET /clusters?format=json&filter=^(10 names)$      for comparison
#   all          GET /clusters, unfiltered                          what not to do
#   ready-plain, stats-plain, clusters-10-plain: the same on the Envoy that keeps every stat
# Envoy's CPU per request: the CPU time of all its threads (/proc/<pid>/task/*/schedstat, ns) over
# a batch of requests on one keep-alive connection (connected and warmed up before), less its idle
# rate (measured first) times the batch's wall time, divided by the requests, less the same for
# /ready on that Envoy in the same round ("net"). utime+stime from /proc/<pid>/stat (10 ms ticks)
# is shown beside it as a cross-check. The client is python3 (stdlib), closed loop, one request at
# a time, as the filter polls. Prints a markdown table (also to --markdown FILE).
#
# Usage: bench/admin-poll-cost.sh [--clusters 1000] [--endpoints 10] [--rounds 5]
#          [--requests 200] [--heavy-requests 20] [--health-checks] [--markdown FILE]
#   --heavy-requests  requests per round for all, json-10 and stats-plain (each costs ms)
#   --health-checks   an active HTTP health check on every cluster (interval 10 s; Envoy's default
#                     no_traffic_interval, 60 s, applies as no traffic flows; the endpoints refuse
#                     connections, so every host ends up /failed_active_hc)
# Needs Envoy 1.40 in .venv (make setup) or ENVOY=/path/to/envoy; python3; curl.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY="${ENVOY:-$repo/.venv/bin/envoy}"
clusters=1000 endpoints=10 rounds=5 requests=200 heavy=20 hc=0 markdown=""
while (($#)); do
  case "$1" in
    --clusters) clusters="$2"; shift 2 ;;
    --endpoints) endpoints="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --heavy-requests) heavy="$2"; shift 2 ;;
    --health-checks) hc=1; shift ;;
    --markdown) markdown="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "admin-poll-cost: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
[[ -x "$ENVOY" ]] || { echo "admin-poll-cost: no Envoy at $ENVOY (make setup, or ENVOY=...)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "admin-poll-cost: python3 is missing" >&2; exit 1; }

work="$(mktemp -d)"
envoy_pids=()
cleanup() {
  for pid in "${envoy_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${envoy_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Two bootstraps, the same $clusters STATIC clusters named like Istio's outbound clusters,
# $endpoints endpoints each on 127.x addresses (never connected to, unless --health-checks),
# admin on a free loopback port:
#   istio  stats_config as an Istio gateway with inflight installed: use_all_default_tags false,
#          Istio's tag regexes, Istio's default stats inclusion list plus the two entries of
#          manifests/istio/common/stats-bootstrap.yaml (wasmcustom.inflight., .membership_healthy);
#   plain  no stats_config: Envoy keeps every stat of every cluster (a gateway without Istio's
#          stats matcher). Only the /stats poll is asked of it; /clusters does not read the store.
gen_bootstrap() { # istio|plain
  python3 - "$1" "$clusters" "$endpoints" "$hc" <<'PY'
import json, sys
shape, n, m, hc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
clusters = []
for i in range(n):
    name = f"outbound|80||svc-{i}.ns.svc.cluster.local"
    eps = []
    for j in range(m):
        k = i * m + j  # unique per cluster and endpoint, all in 127/8
        addr = f"127.{1 + (k >> 16) % 254}.{(k >> 8) & 255}.{k & 255}"
        eps.append({"endpoint": {"address": {"socket_address": {"address": addr, "port_value": 8080}}}})
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}}
    if hc:
        c["health_checks"] = [{"timeout": "1s", "interval": "10s", "unhealthy_threshold": 1,
                               "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}}]
    clusters.append(c)
boot = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": clusters}}
if shape == "istio":  # tools/packaging/common/envoy_bootstrap.json, as far as stats go
    boot["stats_config"] = {
        "use_all_default_tags": False,
        "stats_tags": [
            {"tag_name": "cluster_name", "regex": "^cluster\\.((.+?(\\..+?\\.svc\\.cluster\\.local)?)\\.)"},
            {"tag_name": "tcp_prefix", "regex": "^tcp\\.((.*?)\\.)\\w+?$"},
            {"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"},
            {"tag_name": "response_code_class", "regex": "_rq(_(\\dxx))$"},
            {"tag_name": "http_conn_manager_prefix", "regex": "^http\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
            {"tag_name": "cache", "regex": "(cache\\.(.+?)\\.)"},
            {"tag_name": "component", "regex": "(component\\.(.+?)\\.)"},
            {"tag_name": "tag", "regex": "(tag\\.(.+?);\\.)"},
            {"tag_name": "wasm_filter", "regex": "(wasm_filter\\.(.+?)\\.)"},
        ],
        "stats_matcher": {"inclusion_list": {"patterns": [
            {"prefix": p} for p in ("reporter=", "cluster_manager", "listener_manager", "server",
                                    "cluster.xds-grpc", "wasm", "component", "istio",
                                    "wasmcustom.inflight.")
        ] + [{"suffix": ".membership_healthy"}]}},
    }
json.dump(boot, sys.stdout)
PY
}

start_envoy() { # shape: sets $pid_<shape> and $admin_<shape>
  local shape="$1" base_id=$((40000 + ($$ % 10000) * 2 + ${#envoy_pids[@]}))
  gen_bootstrap "$shape" >"$work/$shape.json"
  "$ENVOY" -c "$work/$shape.json" --concurrency 2 --base-id "$base_id" \
    --admin-address-path "$work/$shape.admin" -l warning >"$work/$shape.log" 2>&1 &
  envoy_pids+=($!)
  printf -v "pid_$shape" %s "$!"
}
wait_live() { # shape
  local shape="$1" pid_var="pid_$1" admin=""
  for _ in $(seq 1200); do # 120 s at most
    kill -0 "${!pid_var}" 2>/dev/null || { echo "admin-poll-cost: Envoy ($shape) exited:" >&2; tail -20 "$work/$shape.log" >&2; exit 1; }
    if [[ -s "$work/$shape.admin" ]]; then
      admin="$(cat "$work/$shape.admin")"
      if [[ "$(curl -s "http://$admin/ready" || true)" == LIVE ]]; then
        printf -v "admin_$shape" %s "$admin"
        return 0
      fi
    fi
    sleep 0.1
  done
  echo "admin-poll-cost: Envoy ($shape) never became LIVE" >&2
  exit 1
}
start_envoy istio
start_envoy plain
wait_live istio
wait_live plain
if ((hc)); then sleep 3; fi # the first round of health checks, so the flags are settled
echo "admin-poll-cost: Envoy $("$ENVOY" --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1)," \
  "istio-shaped pid $pid_istio (admin $admin_istio), plain pid $pid_plain (admin $admin_plain)," \
  "$clusters clusters x $endpoints endpoints$( ((hc)) && echo ', active health checks')" >&2

python3 - "$pid_istio" "$admin_istio" "$pid_plain" "$admin_plain" "$clusters" "$endpoints" \
  "$rounds" "$requests" "$heavy" "$hc" "$markdown" <<'PY'
import http.client, os, statistics, sys, time, urllib.parse

envoys = {"istio": (int(sys.argv[1]), sys.argv[2]), "plain": (int(sys.argv[3]), sys.argv[4])}
n_clusters, n_eps, rounds, requests, heavy, hc = map(int, sys.argv[5:11])
markdown = sys.argv[11]
TICK = os.sysconf("SC_CLK_TCK")

def name(i):
    return f"outbound|80||svc-{i}.ns.svc.cluster.local"

def re2_escape(s):
    # What the filter will do: every non-alphanumeric character preceded by a backslash.
    return "".join(c if c.isascii() and c.isalnum() else "\\" + c for c in s)

def clusters_path(names, fmt=None):
    value = "^(" + "|".join(re2_escape(x) for x in names) + ")$"
    return "/clusters?" + ("format=json&" if fmt else "") + "filter=" + urllib.parse.quote(value, safe="")

# Revisions spread over the config (first, last, in between), as a gateway's would be.
ten = sorted({name(i * (n_clusters - 1) // 9) for i in range(10)})
STATS = "/stats?format=json&filter=membership_healthy"
# (label, Envoy, path, requests per round, clusters expected in the answer, what)
variants = [
    ("ready", "istio", "/ready", requests, None, "`/ready` (baseline)"),
    ("stats", "istio", STATS, requests, None, f"`{STATS}` (today's poll)"),
    ("clusters-1", "istio", clusters_path([name(n_clusters // 2)]), requests, 1, "`/clusters?filter=^(1 name)$`"),
    ("clusters-10", "istio", clusters_path(ten), requests, len(ten), f"`/clusters?filter=^({len(ten)} names)$`"),
    ("clusters-0", "istio", clusters_path(["outbound|80||no-such-svc.ns.svc.cluster.local"]), requests, 0,
     "`/clusters?filter=` matching no cluster"),
    ("json-10", "istio", clusters_path(ten, "json"), heavy, len(ten), f"`/clusters?format=json&filter=^({len(ten)} names)$`"),
    ("all", "istio", "/clusters", heavy, n_clusters, "`/clusters`, unfiltered"),
    ("ready-plain", "plain", "/ready", requests, None, "`/ready` (baseline), all stats"),
    ("stats-plain", "plain", STATS, heavy, None, f"`{STATS}`, all stats"),
    ("clusters-10-plain", "plain", clusters_path(ten), requests, len(ten), f"`/clusters?filter=^({len(ten)} names)$`, all stats"),
]
baseline = {"istio": "ready", "plain": "ready-plain"}

def schedstat_ns(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that just exited
    return total

def stat_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime

def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]

def get(conn, path):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        sys.exit(f"admin-poll-cost: {path} -> {r.status}: {body[:200]!r}")
    return body

def check(label, body, expect):
    if expect is None:
        return
    key = b'"health_status"' if label.startswith("json") else b"::health_flags::"
    if body.count(key) != expect * n_eps:
        sys.exit(f"admin-poll-cost: {label}: {body.count(key)} hosts in the answer, expected {expect * n_eps}")

def batch(envoy, path, count):
    pid, admin = envoys[envoy]
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = get(conn, path)  # connect + warm-up, not counted
    lat = []
    c0, t0, w0 = schedstat_ns(pid), stat_ticks(pid), time.perf_counter()
    for _ in range(count):
        s = time.perf_counter()
        get(conn, path)
        lat.append(time.perf_counter() - s)
    c1, t1, w1 = schedstat_ns(pid), stat_ticks(pid), time.perf_counter()
    conn.close()
    background = idle[envoy] / 100 * (w1 - w0) * 1e6  # µs Envoy would have used anyway
    return ((c1 - c0) / 1e3 - background) / count, \
        ((t1 - t0) * 1e6 / TICK - background) / count, lat, body

# Idle: what each Envoy burns with nobody asking (stats flush, timers, health checks), as a
# share of a core; every batch is charged that share of its wall time less.
idle = {}
for envoy, (pid, _) in envoys.items():
    c0, s = schedstat_ns(pid), time.perf_counter()
    time.sleep(11 if hc else 3)  # with health checks: longer than their interval
    idle[envoy] = (schedstat_ns(pid) - c0) / 1e9 / (time.perf_counter() - s) * 100

per = {v[0]: {"gross": [], "net": [], "ticks": [], "lat": [], "bytes": 0} for v in variants}
loads = []
for r in range(rounds):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    got = {}
    for label, envoy, path, count, expect, _ in order:
        cpu, ticks, lat, body = batch(envoy, path, count)
        check(label, body, expect)
        got[label] = (cpu, ticks)
        per[label]["lat"] += lat
        per[label]["bytes"] = len(body)
    la = loadavg()
    loads.append(float(la[0]))
    for label, envoy, *_ in variants:
        base = got[baseline[envoy]]
        per[label]["gross"].append(got[label][0])
        per[label]["net"].append(got[label][0] - base[0])
        per[label]["ticks"].append(got[label][1] - base[1])
    print(f"round {r + 1}/{rounds}: load {' '.join(la)}; net CPU µs/req "
          + ", ".join(f"{l} {per[l]['net'][-1]:.0f}" for l, *_ in variants if l not in baseline.values()),
          file=sys.stderr)

def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]

def rng(xs):
    return f"{statistics.median(xs):.0f} [{min(xs):.0f}–{max(xs):.0f}]"

lines = [
    f"{n_clusters} clusters × {n_eps} endpoints{', active HTTP health checks every 10 s' if hc else ''}; "
    f"Envoy `--concurrency 2`, Istio-shaped stats config unless marked \"all stats\"; {rounds} rounds, "
    f"variants rotated each round; {requests} requests per variant and round ({heavy} for the "
    f"unfiltered, JSON and all-stats `/stats` ones). Load average (1 min) after each round: "
    f"{' '.join(f'{x:.2f}' for x in loads)}. Envoy idle: {idle['istio']:.2f} % of a core "
    f"(Istio-shaped), {idle['plain']:.2f} % (all stats), subtracted from each batch for its duration.",
    "",
    "| request | answer bytes | Envoy CPU µs/poll, net of `/ready` | gross | utime+stime, net | p50 ms | p99 ms | CPU at 100 ms / 500 ms / 1 s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]
for label, envoy, path, count, expect, what in variants:
    d = per[label]
    is_base = label in baseline.values()
    net = statistics.median(d["net"])
    share = " / ".join(f"{max(net, 0) / (iv * 10):.2f} %" for iv in (100, 500, 1000))
    lines.append(
        f"| {what} | {d['bytes']:,} | {'–' if is_base else rng(d['net'])} | {rng(d['gross'])} | "
        f"{'–' if is_base else rng(d['ticks'])} | {q(d['lat'], 0.5) * 1e3:.2f} | "
        f"{q(d['lat'], 0.99) * 1e3:.2f} | {'–' if is_base else share} |")
lines += ["", "CPU: all Envoy threads, median [min–max] over rounds (schedstat, ns; utime+stime has "
          "10 ms ticks); latency: client side, over all rounds' requests; CPU at an interval: net "
          "CPU per poll ÷ interval, as % of one core."]
out = "\n".join(lines) + "\n"
print(out)
if markdown:
    with open(markdown, "w") as f:
        f.write(out)
PY
