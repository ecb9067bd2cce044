# Shared by the gateway benchmark scripts (sourced, not run): messages,
# medians, CPU time from /proc, a host started in the foreground and
# everything stopped by PID on exit.
#
# The sourcing script sets `name` (its name, for messages) before sourcing,
# and calls `bench_init` once.

say() { echo "$name: $*" >&2; }
die() { say "$*"; exit 1; }

# jq reads host's and loadgen's JSON, curl the admin endpoint's metrics;
# installed when missing and root.
need_jq() {
    local missing=() tool
    for tool in jq curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "needed: sudo apt-get install ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Median of the numeric arguments ("-" when none).
median() {
    printf '%s\n' "$@" | grep -E '^-?[0-9.]+(e[-+]?[0-9]+)?$' | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}

# utime + stime, in clock ticks, of the given processes (fields 14 and 15 of
# /proc/PID/stat); a process that is gone counts 0.
cpu_ticks() {
    local t=0 pid v
    for pid in "$@"; do
        v=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
clk_tck=$(getconf CLK_TCK)
# Microseconds of CPU per item: ticks items.
us_per() { awk -v t="$1" -v n="$2" -v hz="$clk_tck" 'BEGIN { if (n > 0) printf "%.2f\n", t * 1e6 / hz / n; else print "-" }'; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# A sleep that a signal interrupts at once (bash runs traps between
# foreground commands, and during `wait`).
nap_pid=""
nap() {
    sleep "$1" &
    nap_pid=$!
    wait "$nap_pid" || true
    nap_pid=""
}

# Processes to stop on exit, by PID: `bench_pids` get SIGTERM then SIGKILL
# after 15 s; `host_workers` (pids of host's workers seen) get SIGKILL if
# they are still host workers once their master is gone.
bench_pids=()
host_workers=()
bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    [[ -n $nap_pid ]] && kill "$nap_pid" 2>/dev/null
    local pid
    for pid in "${bench_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for pid in "${host_workers[@]}"; do
        grep -qa 'host: ' "/proc/$pid/cmdline" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done
    [[ -n ${bench_tmp:-} ]] && rm -rf "$bench_tmp"
    exit "$status"
}

# Sets root, release, bench_tmp (removed on exit) and the traps.
bench_init() {
    root=$(cd "$(dirname "${BASH_SOURCE[1]}")/.." && pwd)
    cd "$root"
    release=${CARGO_TARGET_DIR:-$root/target}/release
    bench_tmp=$(mktemp -d -t "$name.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Stops a process started here (SIGTERM, SIGKILL after 15 s) and forgets it.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!bench_pids[@]}"; do [[ ${bench_pids[$i]} == "$pid" ]] && unset 'bench_pids[i]'; done
    return 0
}

# The host binary run (a script may point it at another build).
host_bin=""
# host_status CONFIG: `host status --json` of the host run from CONFIG.
host_status() { "${host_bin:-$release/host}" status -c "$1" --json 2>/dev/null; }

# start_host DIR: runs `host start` in the foreground on DIR/host.toml
# (log in DIR/host.log) and waits up to 60 s until every worker of every
# group is ready. Sets host_pid and host_json (the status then).
start_host() {
    local dir=$1 wanted ready
    "${host_bin:-$release/host}" start -c "$dir/host.toml" >"$dir/host.log" 2>&1 &
    host_pid=$!
    bench_pids+=("$host_pid")
    for _ in $(seq 600); do
        kill -0 "$host_pid" 2>/dev/null || { cat "$dir/host.log" >&2; die "host exited during start"; }
        if host_json=$(host_status "$dir/host.toml") &&
            wanted=$(jq '[.groups[].count] | add' <<<"$host_json") &&
            ready=$(jq '[.workers[] | select(.state == "ready")] | length' <<<"$host_json") &&
            ((ready == wanted)); then
            mapfile -t -O "${#host_workers[@]}" host_workers < <(jq -r '.workers[].pid' <<<"$host_json")
            return 0
        fi
        sleep 0.1
    done
    cat "$dir/host.log" >&2
    die "host did not get its workers ready within 60 s"
}

# pids_of GROUP STATE: pids of the workers of GROUP in STATE, from host_json.
pids_of() { jq -r --arg g "$1" --arg s "$2" '.workers[] | select(.group == $g and .state == $s) | .pid' <<<"$host_json"; }

# start_baseline WORKERS: baseline's direct echo (no gateway hop) with
# WORKERS processes; sets baseline_pid, direct_addr[ws|text] and
# direct_pids (its workers).
start_baseline() {
    local out=$bench_tmp/baseline-$1.out
    "$release/baseline-server" --listen 127.0.0.1:0 --websocket 127.0.0.1:0 --text 127.0.0.1:0 \
        --workers "$1" >"$out" 2>"$bench_tmp/baseline.err" &
    baseline_pid=$!
    bench_pids+=("$baseline_pid")
    for _ in $(seq 100); do
        grep -q '^text on ' "$out" && break
        sleep 0.1
    done
    grep -q '^text on ' "$out" || { cat "$bench_tmp/baseline.err" >&2; die "baseline-server did not start"; }
    direct_addr=([ws]=$(sed -n 's/^websocket on //p' "$out") [text]=$(sed -n 's/^text on //p' "$out"))
    mapfile -t direct_pids < <(cat /proc/"$baseline_pid"/task/*/children | tr ' ' '\n' | grep .)
}
# (global: set by start_baseline)
declare -gA direct_addr=()
direct_pids=()
