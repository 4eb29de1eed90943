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
