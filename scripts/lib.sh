# Shared shell helpers for scripts/: free ports, waiting for a port, and stopping what we started by pid.
# Source it; it defines functions only.

# A TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"; return
    fi
  done
}

# wait_for_port PORT PID NAME LOG: waits until PORT accepts connections, failing if PID dies or 60 s pass.
wait_for_port() {
  local port=$1 pid=$2 name=$3 log=$4
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited before listening on $port; its log:" >&2; tail -n 40 "$log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "$name did not listen on $port within 60 s; its log:" >&2; tail -n 40 "$log" >&2; return 1
}

# http_get PORT PATH: the body of GET http://127.0.0.1:PORT/PATH, with bash alone (no curl on a bare machine).
http_get() {
  local port=$1 path=$2
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

STARTED_PIDS=()

# Stops every process started with `remember_pid`, newest first: SIGTERM, then SIGKILL after 10 s.
stop_started() {
  local pid i
  for (( i=${#STARTED_PIDS[@]}-1; i>=0; i-- )); do
    pid=${STARTED_PIDS[$i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}

remember_pid() { STARTED_PIDS+=("$1"); }

# wait_for_line FILE TEXT: waits up to 60 s for TEXT to appear in FILE.
wait_for_line() {
  for _ in $(seq 1 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}

# start_local_stack BROKER_BIN EDOW_BIN_DIR WORK_DIR [STORAGE]: starts a nisshi broker (STORAGE defaults to
# memory; "sqlite" keeps it in WORK_DIR) and edow's registry on free loopback ports, remembering their pids, and
# exports EDOW_BOOTSTRAP_SERVERS, EDOW_SCHEMA_REGISTRY_URL and BROKER_PORT.
start_local_stack() {
  local broker=$1 bin=$2 work=$3 storage=${4:-memory}
  local kafka_port registry_port engine extra=()
  kafka_port=$(free_port)
  case "$storage" in
    memory) engine="memory://nisshi/" ;;
    sqlite) engine="sqlite://broker.db?maintenance_interval=5s" ;;
    *) echo "storage must be memory or sqlite, not '$storage'" >&2; return 2 ;;
  esac
  echo "==> starting the broker ($storage) on 127.0.0.1:$kafka_port"
  case "$broker" in *nisshi-0.8*) extra=(--group-initial-rebalance-delay 100ms) ;; esac
  (cd "$work" && exec "$broker" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine "$engine" "${extra[@]}" \
    >"$work/broker.log" 2>&1) &
  remember_pid $!
  wait_for_port "$kafka_port" $! broker "$work/broker.log"

  registry_port=$(free_port)
  echo "==> starting the schema registry on 127.0.0.1:$registry_port"
  "$bin"/edow-registry --listen "127.0.0.1:$registry_port" --bootstrap-servers "127.0.0.1:$kafka_port" \
    >"$work/registry.log" 2>&1 &
  remember_pid $!
  wait_for_port "$registry_port" $! registry "$work/registry.log"
  export EDOW_BOOTSTRAP_SERVERS="127.0.0.1:$kafka_port"
  export EDOW_SCHEMA_REGISTRY_URL="http://127.0.0.1:$registry_port"
  export BROKER_PORT=$kafka_port
}

# rss_kib PID: resident memory of PID in KiB.
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# restored_all BEGAN_MS LOG: waits until every partition (6) of LOG is restored; prints the ms since BEGAN_MS.
restored_all() {
  local began=$1 log=$2
  for _ in $(seq 1 6000); do
    if [ "$(grep -c 'restored partition' "$log" 2>/dev/null)" -ge 6 ]; then
      echo "$(( $(date +%s%N) / 1000000 - began ))"; return 0
    fi
    sleep 0.05
  done
  echo "not every partition was restored within 5 min" >&2; return 1
}

# measure_in_flight BIN WORK "TARGETS" WORKFLOW [JSON]: for each target count, starts workflows of WORKFLOW (whose
# task no worker serves) until that many are in flight, reports the orchestrator's RSS per in-flight workflow,
# SIGKILLs it and reports how long a new one takes to restore every partition. Uses $orchestrator and the
# caller's `start_orchestrator NAME` (which sets $orchestrator and logs to WORK/orchestrator-NAME.log). With
# JSON, also writes the figures there as a JSON array.
measure_in_flight() {
  local bin=$1 work=$2 targets=$3 workflow=$4 json=${5:-} total=0 target more before now began ms slowest
  local restored rows=()
  for target in $targets; do
    more=$(( target - total ))
    [ "$more" -gt 0 ] || continue
    before=$(rss_kib "$orchestrator")
    echo "==> $target workflows in flight (+$more)"
    # Until every one has started: its state is in the changelog then.
    "$bin"/edow load "$workflow" --count "$more" --id-prefix "$workflow-$target" --until-started --timeout 600 \
      >/dev/null
    sleep 3
    total=$target
    now=$(rss_kib "$orchestrator")
    echo "   RSS $((now / 1024)) MiB; $(( (now - before) * 1024 / more )) bytes per added in-flight workflow"
    kill -KILL "$orchestrator"; wait "$orchestrator" 2>/dev/null || true
    began=$(( $(date +%s%N) / 1000000 ))
    start_orchestrator "$target"
    ms=$(restored_all "$began" "$work/orchestrator-$target.log")
    slowest=$(grep -o 'elapsed_ms=[0-9]*' "$work/orchestrator-$target.log" | cut -d= -f2 | sort -n | tail -n 1)
    sleep 2
    restored=$(rss_kib "$orchestrator")
    echo "   SIGKILL, then a new orchestrator restored all 6 partitions ${ms} ms after it started (group join"
    echo "   included; partitions are restored concurrently, the slowest took ${slowest} ms)"
    echo "   RSS after restore: $((restored / 1024)) MiB; $(( restored * 1024 / target )) bytes per in-flight workflow (all included)"
    rows+=("{\"in_flight\": $target, \"added_bytes_per_workflow\": $(( (now - before) * 1024 / more )), \"restore_ms_after_start\": $ms, \"restore_ms_slowest_partition\": $slowest, \"rss_kib_after_restore\": $restored, \"bytes_per_workflow_after_restore\": $(( restored * 1024 / target ))}")
  done
  if [ -n "$json" ]; then
    local IFS=,
    echo "[${rows[*]}]" >"$json"
  fi
}
