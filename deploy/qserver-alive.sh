#!/usr/bin/env bash
# Liveness check for qserver (the Kubernetes livenessProbe runs it in the container).
#
# The gRPC health service only says "the model is loaded and we are not draining": it stays
# SERVING when every engine worker is stuck. This check asks whether the model is finishing
# work: it reads qserver's own /metrics on loopback and fails when requests have been in
# flight for STALL seconds while the model made no progress. Progress is generated tokens
# (each uncached Reformulate answer adds its tokens) plus successful Evaluate and Benchmark
# calls. Cache hits and refused or timed-out requests do not count: a stuck engine still
# produces those. An idle server passes, and so does a busy one that keeps answering however
# slowly (even while it sheds load), so an overloaded pod is not restarted for being busy.
# A metrics endpoint that does not answer fails too (the probe's timeoutSeconds bounds it).
# Known blind spot: one Evaluate or Benchmark call longer than STALL with no other traffic.
#
# State between runs: one line in $STATE ("<progress> <epoch seconds when last seen moving or
# idle>"). Needs bash (for /dev/tcp), awk and date; the image has no curl.
set -euo pipefail

port="${QSERVER_ALIVE_METRICS_PORT:-9090}"
stall="${QSERVER_ALIVE_STALL_SECS:-120}"
state="${QSERVER_ALIVE_STATE:-/tmp/qserver-alive.state}"

if ! { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
  echo "qserver-alive: no metrics endpoint on 127.0.0.1:$port (is QSERVER_METRICS_LISTEN set?)"
  exit 1
fi
printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
metrics="$(cat <&3)"
exec 3<&-

# Model progress, and RPCs admitted but not answered yet.
read -r finished in_flight < <(awk '
  /^qreformulate_generated_tokens_total / { done += $NF }
  /^qreformulate_requests_total[{]/ && /code="OK"/ && !/rpc="Reformulate"/ { done += $NF }
  /^qreformulate_in_flight_requests / { busy = $NF }
  END { if (busy == "") busy = -1; printf "%d %d\n", done, busy }' <<<"$metrics")
if (( in_flight < 0 )); then
  echo "qserver-alive: 127.0.0.1:$port/metrics has no qreformulate_in_flight_requests"
  exit 1
fi

now="$(date +%s)"
last_finished=-1
since="$now"
if [[ -r "$state" ]]; then
  read -r saved_finished saved_since < "$state" || true
  # A damaged state file starts the count afresh rather than failing the probe.
  if [[ "${saved_finished:-}" =~ ^[0-9]+$ && "${saved_since:-}" =~ ^[0-9]+$ ]]; then
    last_finished="$saved_finished"
    since="$saved_since"
  fi
fi
if (( in_flight == 0 || finished != last_finished )); then
  echo "$finished $now" > "$state"
  exit 0
fi
if (( now - since >= stall )); then
  echo "qserver-alive: $in_flight requests in flight and no model progress for $((now - since)) s (limit ${stall} s)"
  exit 1
fi
exit 0
