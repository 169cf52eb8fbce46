#!/usr/bin/env bash
# Volume provisioning, each against its baseline in the same run, on a QCOW2
# image (IMAGE_GIB GiB of incompressible data, 1 GiB more of virtual size)
# served over loopback HTTP by one server for both sides:
#   1. cache miss, end to end: kiln (hash while downloading, convert from the
#      cache) vs the naive pipeline `curl -o` + `sha256sum -c` + `qemu-img convert`
#   2. cache hit: kiln onto a new volume vs `qemu-img convert` alone
# kiln's times are the server's own (job created_at -> completed_at). Both
# sides write raw files on the same filesystem, and both end with the data
# flushed: kiln fsyncs the volume, the baselines are followed by `sync -f`.
# Each is run RUNS times, alternating; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_GIB="${IMAGE_GIB:-2}"; RUNS="${RUNS:-3}"
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench-provision.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null; done; rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "making a ${IMAGE_GIB} GiB-data QCOW2 image..."
mkdir -p "$W/www"
(openssl enc -aes-128-ctr -pass pass:kiln -nosalt -pbkdf2 </dev/zero 2>/dev/null || true) | head -c $((IMAGE_GIB << 30)) > "$W/data.raw"
truncate -s $(((IMAGE_GIB + 1) << 30)) "$W/data.raw"
qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/www/img.qcow2"
rm "$W/data.raw"
(cd "$W/www" && sha256sum img.qcow2 > img.qcow2.sha256)
IMG_BYTES=$(stat -c %s "$W/www/img.qcow2")
HP=$(port)
python3 -m http.server -b 127.0.0.1 "$HP" -d "$W/www" >/dev/null 2>&1 & PIDS+=($!)
URL="http://127.0.0.1:$HP/img.qcow2"
sleep 1

KP=$(port)
start_kiln() {  # $1 = image cache dir
  "$BIN" serve --addr "127.0.0.1:$KP" --cache-dir "$W/kiln" --image-cache-dir "$1" \
    --volume-dir "$W/vols" --log-format text 2>>"$W/kiln.log" & KPID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$KP/health" >/dev/null && return; sleep 0.1; done
  echo "kiln did not start"; cat "$W/kiln.log"; exit 1
}
stop_kiln() { kill "$KPID"; wait "$KPID" 2>/dev/null || true; }
# Provision NAME; print the job's server-side seconds and its cache_hit.
provision() {
  local id
  id=$(curl -sf -X POST "http://127.0.0.1:$KP/api/v1/provision" -H 'Content-Type: application/json' \
    -d "{\"image_url\":\"$URL\",\"volume_name\":\"$1\",\"volume_size_gb\":$((IMAGE_GIB + 1)),\"image_type\":\"qcow2\"}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  while :; do
    local s; s=$(curl -sf "http://127.0.0.1:$KP/api/v1/status/$id")
    case "$s" in *'"status":"completed"'*) break;; *'"status":"failed"'*|*'"status":"cancelled"'*) echo "$s" >&2; exit 1;; esac
    sleep 0.05
  done
  echo "$s" | python3 "$W/dur.py"
}
cat > "$W/dur.py" <<'PY'
import json, sys, datetime
v = json.load(sys.stdin)
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
print("%.3f %s" % ((t(v["completed_at"]) - t(v["created_at"])).total_seconds(), str(v["cache_hit"]).lower()))
PY
secs() { local t0; t0=$(date +%s.%N); "$@"; python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$(date +%s.%N)"; }
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.3f}")' "$@"; }

naive() {
  curl -sf -o "$W/naive/img.qcow2" "$URL" && curl -sf -o "$W/naive/img.qcow2.sha256" "$URL.sha256" \
    && (cd "$W/naive" && sha256sum -c --quiet img.qcow2.sha256) \
    && qemu-img convert -f qcow2 -O raw "$W/naive/img.qcow2" "$W/naive/vol.raw" && sync -f "$W/naive/vol.raw"
}
convert_only() { qemu-img convert -f qcow2 -O raw "$1" "$W/conv.raw" && sync -f "$W/conv.raw"; }

MISS_K=(); MISS_B=(); HIT_K=(); HIT_B=()
mkdir -p "$W/vols"
for r in $(seq "$RUNS"); do
  echo "run $r/$RUNS"
  # 1. miss: a fresh image cache each run.
  rm -rf "$W/naive" && mkdir -p "$W/naive" && sync
  MISS_B+=("$(secs naive)"); rm -rf "$W/naive"; sync
  start_kiln "$W/images-$r"
  read -r t hit < <(provision "miss-$r"); [ "$hit" = false ] || { echo "expected a miss"; exit 1; }
  MISS_K+=("$t")
  rm -f "$W/vols/miss-$r"; sync
  # 2. hit: the image is cached now.
  read -r t hit < <(provision "hit-$r"); [ "$hit" = true ] || { echo "expected a hit"; exit 1; }
  HIT_K+=("$t")
  rm -f "$W/vols/hit-$r"; sync
  CACHED=$(find "$W/images-$r/sha256" -type f | head -1)
  HIT_B+=("$(secs convert_only "$CACHED")"); rm -f "$W/conv.raw"; sync
  stop_kiln
  rm -rf "$W/images-$r"
done

mk=$(median "${MISS_K[@]}"); mb=$(median "${MISS_B[@]}"); hk=$(median "${HIT_K[@]}"); hb=$(median "${HIT_B[@]}")
{
  echo "# kiln provisioning bench, $(date -u +%FT%TZ), $(nproc) cores, image ${IMAGE_GIB} GiB data / $((IMAGE_GIB + 1)) GiB virtual, ${IMG_BYTES} bytes QCOW2, medians of $RUNS"
  printf "%-44s %8s s  (runs: %s)\n" "cache miss: kiln" "$mk" "${MISS_K[*]}"
  printf "%-44s %8s s  (runs: %s)\n" "cache miss: curl -o + sha256sum -c + qemu-img" "$mb" "${MISS_B[*]}"
  printf "%-44s %8s    (goal <= 0.80)\n" "ratio kiln/naive" "$(python3 -c "print(f'{$mk/$mb:.2f}')")"
  printf "%-44s %8s s  (runs: %s)\n" "cache hit: kiln" "$hk" "${HIT_K[*]}"
  printf "%-44s %8s s  (runs: %s)\n" "cache hit: qemu-img convert" "$hb" "${HIT_B[*]}"
  printf "%-44s %8s    (goal <= 1.05)\n" "ratio kiln/qemu-img" "$(python3 -c "print(f'{$hk/$hb:.2f}')")"
} | tee "$OUT/provision.txt"
