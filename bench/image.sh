#!/usr/bin/env bash
# Image build and push: kiln (POST /, buildah under the job engine, both
# tags pushed, callbacks) against `buildah bud` + `buildah push` of the
# same context to the same registry, in the same run. Both sides build
# without the layer cache (kiln with NO_CACHE=true, buildah bud's default),
# use vfs storage, and push two tags. The context: Debian's static busybox
# and a Dockerfile with four RUN steps. RUNS runs each, alternating; medians.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench-image.XXXXXX); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null; done; rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RP=$(port); REG="127.0.0.1:$RP"
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s/registry\nhttp:\n  addr: %s\n' "$W" "$REG" > "$W/registry.yml"
docker-registry serve "$W/registry.yml" >/dev/null 2>&1 & PIDS+=($!)
mkdir -p "$W/ctx"; cp /bin/busybox "$W/ctx/"
cat > "$W/ctx/Dockerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
ARG N=0
RUN ["/bin/busybox", "mkdir", "-p", "/app", "/data"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/zero of=/data/blob bs=1M count=16 2>/dev/null"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox echo $N > /app/n"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox sha256sum /data/blob > /app/sum"]
EOF
tar czf "$W/src.tgz" -C "$W/ctx" .
B64=$(base64 -w0 "$W/src.tgz")
KP=$(port)
"$BIN" serve --addr "127.0.0.1:$KP" --cache-dir "$W/kiln" --insecure-registry "$REG" --no-cache --log-format text 2>"$W/kiln.log" & PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$KP/health" >/dev/null && break; sleep 0.1; done
cat > "$W/dur.py" <<'PY'
import json, sys, datetime
v = json.load(sys.stdin)
t = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
assert v["status"] == "completed", v
print("%.3f" % (t(v["completed_at"]) - t(v["created_at"])).total_seconds())
PY
kiln_build() {  # $1 = build number
  printf '{"app":"bench","space":"s","app_uuid":"0b5e2b2c-1111-2222-3333-444455556666","build_uuid":"8a3e0f2a-aaaa-bbbb-cccc-%012d","build_number":%d,"sources":"data:application/gzip;base64,%s","gm_registry_host":"%s","gm_registry_repo":"kiln"}' "$1" "$1" "$B64" "$REG" > "$W/body.json"
  local id; id=$(curl -sf -X POST "http://127.0.0.1:$KP/" --data-binary @"$W/body.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  while :; do
    local s; s=$(curl -sf "http://127.0.0.1:$KP/api/v1/status/$id")
    case "$s" in *'"status":"completed"'*|*'"status":"failed"'*|*'"status":"cancelled"'*) echo "$s" | python3 "$W/dur.py"; return;; esac
    sleep 0.05
  done
}
BA=(buildah --root "$W/buildah/root" --runroot "$W/buildah/run" --storage-driver vfs)
plain_build() {  # $1 = build number
  local t0 repo="$REG/plain/bench"; t0=$(date +%s.%N)
  "${BA[@]}" bud --isolation chroot -q -t "$repo:1.$1" -t "$repo:latest" "$W/ctx" >/dev/null
  "${BA[@]}" push -q --tls-verify=false "$repo:1.$1" "docker://$repo:1.$1"
  "${BA[@]}" push -q --tls-verify=false "$repo:latest" "docker://$repo:latest"
  python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$(date +%s.%N)"
}
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(map(float, sys.argv[1:])):.3f}")' "$@"; }
K=(); B=()
kiln_build 1 >/dev/null; plain_build 1 >/dev/null   # warm both
for r in $(seq "$RUNS"); do
  K+=("$(kiln_build $((r + 1)))")
  B+=("$(plain_build $((r + 1)))")
done
k=$(median "${K[@]}"); b=$(median "${B[@]}")
{
  echo "# kiln image bench, $(date -u +%FT%TZ), $(nproc) cores, busybox context, 4 RUN steps, 2 tags pushed, medians of $RUNS"
  printf "%-40s %8s s  (runs: %s)\n" "kiln POST / (build + push)" "$k" "${K[*]}"
  printf "%-40s %8s s  (runs: %s)\n" "buildah bud + buildah push" "$b" "${B[*]}"
  printf "%-40s %8s    (goal <= 1.10)\n" "ratio kiln/buildah" "$(python3 -c "print(f'{$k/$b:.2f}')")"
} | tee "$OUT/image.txt"
