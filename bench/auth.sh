#!/usr/bin/env bash
# What access control costs: requests per second on GET /api/v1/status/{id}
# over TLS with wrk, side by side in one run:
#   open     no auth configured (the baseline)
#   bearer   Authorization: Bearer, against a token file of 100 entries
#   hashed   the same, the token stored as name:sha256:<hex>
#   x-api    X-API-Token header
# Each mode runs ROUNDS times, interleaved, and the median is reported with
# its ratio to the open baseline. wrk cannot present client certificates
# (the identity is read once per connection, at the handshake) nor compute a
# fresh HMAC per request, so those two paths are not in this table.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
DUR="${DUR:-8}"; ROUNDS="${ROUNDS:-3}"; CONN="${CONN:-32}"
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench-auth.XXXXXX)
trap 'kill $PID 2>/dev/null || true; rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$W/tls.key" -out "$W/tls.crt" 2>/dev/null
{ for i in $(seq 1 98); do echo "user$i:$(openssl rand -hex 16)"; done
  echo "bench:s3cret-bench-token"
  echo "hashed:sha256:$(printf %s hashed-bench-token | sha256sum | cut -d' ' -f1)"; } > "$W/tokens"
chmod 600 "$W/tokens"
mkdir -p "$W/src" && printf 'module:\n\ttrue\n' > "$W/src/Makefile"
mkdir -p "$W/t" && echo x > "$W/t/f" && tar czf "$W/tiny.tgz" -C "$W" t
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start() { # mode
  local extra=()
  [ "$1" = open ] || extra=(--api-tokens-file "$W/tokens")
  "$BIN" serve --addr "127.0.0.1:$PORT" --cache-dir "$W/c" --drbd-dir "$W/src" \
    --certfile "$W/tls.crt" --keyfile "$W/tls.key" --log-level warn "${extra[@]}" 2>>"$W/server.log" &
  PID=$!
  for _ in $(seq 100); do curl -skf "https://127.0.0.1:$PORT/healthz" >/dev/null && return; sleep 0.1; done
  echo "kiln did not start"; cat "$W/server.log"; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

# One job to look at (it fails fast; its status document is what we fetch).
start open
JOB=$(curl -sk -X POST -H 'X-Kernel-Version: 6.1.0-9-amd64' --data-binary @"$W/tiny.tgz" \
  "https://127.0.0.1:$PORT/api/v1/build" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
stop
URL="https://127.0.0.1:$PORT/api/v1/status/$JOB"

declare -A HDR=(
  [open]=""
  [bearer]="Authorization: Bearer s3cret-bench-token"
  [hashed]="Authorization: Bearer hashed-bench-token"
  [x-api]="X-API-Token: s3cret-bench-token"
)
MODES=(open bearer hashed x-api)
declare -A RPS
for r in $(seq 1 "$ROUNDS"); do
  for m in "${MODES[@]}"; do
    start "$m"
    code=$(curl -sk -o /dev/null -w '%{http_code}' ${HDR[$m]:+-H "${HDR[$m]}"} "$URL")
    [ "$code" = 200 ] || { echo "$m: status $code"; exit 1; }
    args=(-t2 -c"$CONN" -d"${DUR}s" --latency)
    [ -n "${HDR[$m]}" ] && args+=(-H "${HDR[$m]}")
    wrk "${args[@]}" "$URL" > "$OUT/wrk-$m-$r.txt"
    non2xx=$(grep -c 'Non-2xx' "$OUT/wrk-$m-$r.txt" || true)
    [ "$non2xx" = 0 ] || { echo "$m: non-2xx answers"; cat "$OUT/wrk-$m-$r.txt"; exit 1; }
    RPS[$m]+="$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk-$m-$r.txt") "
    stop
  done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
base=$(echo "${RPS[open]}" | median)
printf '\n%-8s %12s %8s   %s\n' mode "req/s (med)" ratio "rounds"
for m in "${MODES[@]}"; do
  med=$(echo "${RPS[$m]}" | median)
  printf '%-8s %12.0f %8.3f   %s\n' "$m" "$med" "$(echo "$med / $base" | bc -l)" "${RPS[$m]}"
done | tee "$OUT/auth.txt"
echo "wrk -t2 -c$CONN -d${DUR}s over TLS (ECDSA P-256, keep-alive) on $(nproc) cores; raw output in bench/out/"
