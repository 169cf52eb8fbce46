#!/usr/bin/env bash
# Changed block tracking, each against its baseline in the same run:
#   1. full-scan delta of two 4 GiB raw images, 1% of 512 KiB blocks changed,
#      vs `cmp` reading the same amount (base against an identical copy: cmp
#      stops at the first difference, so it is timed where it must read all)
#   2. QCOW2 overlay delta (allocation map) vs that full scan
#   3. page latency at offset 10,000,000 vs offset 0 (a ~10.5M-block delta in
#      40,960 runs, 4 KiB blocks, written as metadata-only zero clusters)
# Everything through the real server and its API. Files are page-cache warm.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB="${SIZE_GIB:-4}"
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench-cbt.XXXXXX); PID=""
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"
V="$W/vols"; mkdir -p "$V"
G=/apis/cbt.storage.k8s.io/v1alpha1/namespaces/default

echo "making ${SIZE_GIB} GiB images..."
(openssl enc -aes-128-ctr -pass pass:kiln -nosalt -pbkdf2 </dev/zero 2>/dev/null || true) | head -c $((SIZE_GIB << 30)) > "$V/base.raw"
cp "$V/base.raw" "$V/same.raw"; cp "$V/base.raw" "$V/target.raw"
BLOCKS=$((SIZE_GIB * 2048)); CHANGED=$((BLOCKS / 100))
python3 - "$V/target.raw" "$BLOCKS" "$CHANGED" <<'PY'
import os, random, sys
f, blocks, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)
fd = os.open(f, os.O_WRONLY)
for b in sorted(random.sample(range(blocks), n)):
    os.pwrite(fd, b"\xa5" * 4096, b * 524288 + 1000)
os.close(fd)
PY
qemu-img convert -O qcow2 "$V/base.raw" "$V/base.qcow2"
qemu-img create -q -f qcow2 -b "$V/base.qcow2" -F qcow2 "$V/top.qcow2"
python3 - "$BLOCKS" "$CHANGED" > "$W/qio" <<'PY'
import random, sys
blocks, n = int(sys.argv[1]), int(sys.argv[2])
random.seed(7)
for b in sorted(random.sample(range(blocks), n)):
    print(f"write -P 0xa5 {b * 524288 + 1000} 4096")
PY
qemu-io "$V/top.qcow2" < "$W/qio" >/dev/null
# ~10.5M changed 4 KiB blocks in 40,960 runs: every other MiB of 80 GiB, zeroed in an overlay.
qemu-img create -q -f qcow2 "$V/big-base.qcow2" 100G
qemu-img create -q -f qcow2 -b "$V/big-base.qcow2" -F qcow2 "$V/big-top.qcow2"
for i in $(seq 0 2 81919); do echo "write -z $((i << 20)) 1M"; done | qemu-io "$V/big-top.qcow2" >/dev/null
cat "$V"/*.raw > /dev/null   # warm the page cache for both sides alike

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --addr "127.0.0.1:$PORT" --cache-dir "$W/c" --drbd-dir /nonexistent --snapshot-root "$V" --log-level warn 2>"$W/server.log" &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
U="http://127.0.0.1:$PORT$G"
snap() { curl -sf -X POST -H 'content-type: application/json' -d "{\"metadata\":{\"name\":\"$1\"},\"spec\":{\"source\":{\"path\":\"$V/$2\"}}}" "$U/volumesnapshots" >/dev/null; }
now() { date +%s.%N; }
delta() { # name base target block-size -> seconds until computed
  local t0; t0=$(now)
  curl -sf -X POST -H 'content-type: application/json' \
    -d "{\"metadata\":{\"name\":\"$1\"},\"spec\":{\"baseVolumeSnapshotName\":\"$2\",\"targetVolumeSnapshotName\":\"$3\",\"blockSizeBytes\":$4}}" "$U/volumesnapshotdeltas" >/dev/null
  while :; do
    st=$(curl -sf "$U/volumesnapshotdeltas/$1")
    case "$st" in
      *'"state":"computed"'*) break ;;
      *'"state":"failed"'*) echo "delta $1 failed: $st"; exit 1 ;;
    esac
    sleep 0.005
  done
  echo "$(now) - $t0" | bc
}
snap base base.raw; snap target target.raw; snap qbase base.qcow2; snap qtop top.qcow2
snap bbase big-base.qcow2; snap btop big-top.qcow2

t0=$(now); cmp "$V/base.raw" "$V/same.raw"; CMP=$(echo "$(now) - $t0" | bc)
FULL=$(delta full base target 524288)
N=$(curl -sf "$U/volumesnapshotdeltas/full" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["totalChangedBlocks"])')
[ "$N" = "$CHANGED" ] || { echo "full scan found $N changed blocks, expected $CHANGED"; exit 1; }
QC=$(delta overlay qbase qtop 524288)
ms() { curl -sf "$U/volumesnapshotdeltas/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["computeSeconds"])'; }
FULL_C=$(ms full); QC_C=$(ms overlay)
N=$(curl -sf "$U/volumesnapshotdeltas/overlay" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["totalChangedBlocks"])')
[ "$N" = "$CHANGED" ] || { echo "overlay delta found $N changed blocks, expected $CHANGED"; exit 1; }
delta big bbase btop 4096 >/dev/null
TOTAL=$(curl -sf "$U/volumesnapshotdeltas/big" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["totalChangedBlocks"])')
lat() { # offset -> median seconds of 30 page requests (limit 256)
  for _ in $(seq 30); do curl -sf -o /dev/null -w '%{time_total}\n' "$U/volumesnapshotdeltas/big?fetchcbd=true&limit=256&offset=$1"; done | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
L0=$(lat 0); L10=$(lat 10000000)
BYTES=$((SIZE_GIB << 30))
{
  printf '%-58s %10s %10s\n' case value ratio
  printf '%-58s %8.2f s %10s\n' "cmp, ${SIZE_GIB} GiB pair, full read (baseline)" "$CMP" ""
  printf '%-58s %8.2f s %10.2f\n' "kiln full-scan delta, 1% changed (throughput vs cmp)" "$FULL" "$(echo "$CMP / $FULL" | bc -l)"
  printf '%-58s %8.3f s %10.1f\n' "kiln qcow2 overlay delta, wall (speed-up vs full scan)" "$QC" "$(echo "$FULL / $QC" | bc -l)"
  printf '%-58s %8.4f s %10.1f\n' "kiln qcow2 overlay delta, compute (vs full-scan compute)" "$QC_C" "$(echo "$FULL_C / $QC_C" | bc -l)"
  printf '%-58s %8.3f s\n' "  (full-scan compute)" "$FULL_C"
  printf '%-58s %8.4f s %10s\n' "page at offset 0 ($TOTAL-block delta)" "$L0" ""
  printf '%-58s %8.4f s %10.2f\n' "page at offset 10,000,000 (latency vs offset 0)" "$L10" "$(echo "$L10 / $L0" | bc -l)"
  echo "full scan: $(echo "$BYTES * 2 / $FULL / 1073741824" | bc -l | cut -c1-5) GiB/s read; cmp: $(echo "$BYTES * 2 / $CMP / 1073741824" | bc -l | cut -c1-5) GiB/s; $(nproc) cores"
} | tee "$OUT/cbt.txt"
