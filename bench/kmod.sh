#!/usr/bin/env bash
# kiln kmod benchmarks, each side by side with its baseline in the same run:
#   1. cache-hit request time, same bytes   vs  openssl dgst -sha256 FILE
#      (sent whole, and with the digest declared so the body is never sent)
#   2. cache-hit request time, repacked tree vs  gzip -dc FILE | openssl dgst -sha256
#      (both on the Debian headers tarball and on a ~100 MB synthetic one)
#      plus the floor: curl posting the same file to a sink that does no work
#   3. server peak RSS (VmHWM) after taking the 100 MB uploads
#   4. a cold build through kiln (fresh server, headers new to it) vs raw
#      `make module KDIR=...` on a tree extracted beforehand, and a rebuild
#      against the same headers (the kept tree) vs the same raw make
# Needs the fixtures of scripts/test.sh. Prints a table; writes bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
FIX="${KILN_TEST_FIXTURES:-$PWD/target/kiln-fixtures}"
[ -f "$FIX/ready" ] || { echo "run ./scripts/test.sh first (it prepares $FIX)"; exit 1; }
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine >/dev/null; }
KVER=$(cat "$FIX/kver"); KB=$(cat "$FIX/kbuild")
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench.XXXXXX); trap 'kill $PID $SINK 2>/dev/null || true; rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"

# Module source: the same hello module the tests build.
mkdir -p "$W/src/src"
cat > "$W/src/src/hello.c" <<'C'
#include <linux/module.h>
#include <linux/init.h>
static int __init h_init(void) { return 0; }
static void __exit h_exit(void) {}
module_init(h_init); module_exit(h_exit);
MODULE_LICENSE("GPL");
C
echo 'obj-m := hello.o' > "$W/src/src/Kbuild"
printf 'module:\n\t$(MAKE) -C $(KDIR) M=$(CURDIR)/src modules\n' > "$W/src/Makefile"

# Inputs: the Debian tarball, a ~100 MB one (same tree plus incompressible data), and repacks.
H="$FIX/headers.tgz"
mkdir -p "$W/tree" && tar xzf "$H" -C "$W/tree"
head -c 90000000 /dev/urandom > "$W/tree/usr/src/linux-headers-$KVER/bench-blob.bin"
BIG="$W/big.tgz"
tar czf "$BIG" -C "$W/tree" "usr/src/linux-headers-$KVER" "usr/src/linux-headers-${KVER%-amd64}-common" "usr/lib/$KB"
for i in 1 2 3 4 5 6; do
  (cd "$W/tree" && find usr -type f -o -type l | sort -r | tar czf "$W/rep-small-$i.tgz" --no-recursion --mtime="2001-01-0$i" \
     --exclude="usr/src/linux-headers-$KVER/bench-blob.bin" -T -)
  (cd "$W/tree" && find usr -type f -o -type l | sort -r | tar czf "$W/rep-big-$i.tgz" --no-recursion --mtime="2002-01-0$i" -T -)
done

PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$BIN" serve --addr "127.0.0.1:$PORT" --cache-dir "$W/cache" --drbd-dir "$W/src" --maxbytesbody 400000000 \
  --log-level warn 2>"$OUT/server.log" & PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/v1/hello" >/dev/null && break; sleep 0.1; done
URL="http://127.0.0.1:$PORT/api/v1/build"
SPORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
python3 bench/sink.py "$SPORT" & SINK=$!

# 4. Cold builds: each on a fresh server (its own cache, data dir and header
#    tree store), so the headers are new to it and kiln must receive,
#    validate, digest and extract them before make runs. Timed from the
#    upload to the job's end (status polled every 20 ms). Header trees kept
#    on disk (the default, DATA_DIR/trees) and on a tmpfs (--header-tree-dir).
#    Interleaved with the baseline: raw make on a tree extracted beforehand.
RAW="$W/raw"; mkdir -p "$RAW"; tar xzf "$H" -C "$RAW"; cp -a "$W/src" "$RAW/src"
sed -i "s#include /usr/src/#include $RAW/usr/src/#" "$RAW/usr/src/linux-headers-$KVER/Makefile"
SHM=$(mktemp -d /dev/shm/kiln-bench-trees.XXXXXX); trap 'kill $PID $SINK 2>/dev/null || true; rm -rf "$W" "$SHM"' EXIT
poll() { while [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/api/v1/status/$2")" = 202 ]; do sleep 0.02; done
  curl -s "$1/api/v1/status/$2" | grep -q '"completed"' || { echo "build $2 failed"; curl -s "$1/api/v1/jobs/$2/logs" | tail -20; exit 1; }; }
build_once() { # URL QUERY -> seconds from upload to completion
  local t0 t1 j; t0=$(date +%s.%N)
  j=$(curl -s -H "X-Kernel-Version: $KVER" --data-binary @"$H" "$1/api/v1/build$2" | sed -n 's/.*"job_id":"\([0-9a-f]*\)".*/\1/p')
  poll "$1" "$j"; t1=$(date +%s.%N); python3 -c "print(f'{$t1-$t0:.3f}')"; }
cold_once() { # LABEL N [server args] -> seconds
  local p d pid t; p=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  d="$W/cold-$1-$2"
  "$BIN" serve --addr "127.0.0.1:$p" --cache-dir "$d" --drbd-dir "$W/src" --log-level warn "${@:3}" 2>>"$OUT/server.log" & pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/api/v1/hello" >/dev/null && break; sleep 0.05; done
  t=$(build_once "http://127.0.0.1:$p" ""); kill $pid; wait $pid 2>/dev/null || true
  sync; echo "$t"; } # written-back before the next measure, so no run pays for another's writeback
make_once() { local t0 t1; (cd "$RAW/src" && rm -rf src/*.o src/*.ko src/.*.cmd src/*.mod* src/Module.symvers src/modules.order)
  t0=$(date +%s.%N); make -s -C "$RAW/src" -j"$(nproc)" module KDIR="$RAW/usr/src/linux-headers-$KVER" >/dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1-$t0:.3f}')"; }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
N=${RUNS:-5}; CD=(); CT=(); MK=()
for i in $(seq "$N"); do
  CD+=("$(cold_once disk "$i")"); CT+=("$(cold_once tmpfs "$i" --header-tree-dir "$SHM/$i")"); MK+=("$(make_once)")
done
COLD=$(echo "${CD[*]}" | median); COLDT=$(echo "${CT[*]}" | median); MAKE=$(echo "${MK[*]}" | median)
# The same headers again, forced to rebuild (a new module source, a new
# signing key or ?force=true): kiln reuses the kept tree and only digests the
# upload. Against raw make, interleaved.
build_once "http://127.0.0.1:$PORT" "" >/dev/null
WB=(); MK2=()
for i in $(seq "$N"); do WB+=("$(build_once "http://127.0.0.1:$PORT" "?force=true")"); MK2+=("$(make_once)"); done
WARM=$(echo "${WB[*]}" | median); MAKE2=$(echo "${MK2[*]}" | median)

# Prime the big tarball's key (one build) so its requests are hits.
J=$(curl -s -H "X-Kernel-Version: $KVER" --data-binary @"$BIG" "$URL" | python3 -c 'import json,sys;print(json.load(sys.stdin)["job_id"])')
while [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/api/v1/status/$J")" = 202 ]; do sleep 0.1; done

hf() { hyperfine --style none --export-json "$OUT/$1.json" "${@:2}" >/dev/null 2>&1; python3 -c "
import json;r=json.load(open('$OUT/$1.json'))['results'];print(' '.join(f\"{x['median']:.4f}\" for x in r))"; }
post() { echo "curl -s -o /dev/null -H X-Kernel-Version:$KVER --data-binary @$1 $URL"; }

sink() { echo "curl -s -o /dev/null --data-binary @$1 http://127.0.0.1:$SPORT/"; }
read -r SAME_S BASE_S FLOOR_S < <(hf same-small -N --warmup 2 --runs 15 "$(post "$H")" "openssl dgst -sha256 $H" "$(sink "$H")")
read -r SAME_B BASE_B FLOOR_B < <(hf same-big -N --warmup 1 --runs 8 "$(post "$BIG")" "openssl dgst -sha256 $BIG" "$(sink "$BIG")")
# Same bytes with the digest declared (X-Kiln-Content-SHA256): the client
# hashes (openssl), the server answers from its first-level index before the
# body is sent (curl streams -T uploads and waits for 100 Continue first, where
# --data-binary @F would read the whole file into memory). Through bash.
declared() { echo "curl -s -o /dev/null -X POST -H X-Kernel-Version:$KVER -H X-Kiln-Content-SHA256:\$(openssl dgst -sha256 -r $1 | cut -d' ' -f1) -T $1 $URL"; }
# Same bytes through kiln's own client: it hashes the file, asks
# GET /api/v1/build/{sha256}, and uploads only on a miss.
cli() { echo "$BIN kmod build --server http://127.0.0.1:$PORT --kernel-version $KVER --headers $1 -o $W/cli-out.tgz"; }
read -r CLI_S < <(hf cli-small -N --warmup 2 --runs 15 "$(cli "$H")")
read -r CLI_B < <(hf cli-big -N --warmup 1 --runs 8 "$(cli "$BIG")")
read -r DECL_S < <(hf decl-small --warmup 2 --runs 15 -S bash "$(declared "$H")")
read -r DECL_B < <(hf decl-big --warmup 1 --runs 8 -S bash "$(declared "$BIG")")
# Repacked: each run sends a different repack (new bytes, same tree), so every one takes the tree path.
read -r REP_S < <(hf rep-small -N --runs 1 -L i 1,2,3,4,5,6 "$(post "$W/rep-small-{i}.tgz")" | tr ' ' '\n' | sort -n | sed -n 3p)
read -r REPB_S < <(hf rep-big -N --runs 1 -L i 1,2,3,4,5,6 "$(post "$W/rep-big-{i}.tgz")" | tr ' ' '\n' | sort -n | sed -n 3p)
read -r GZ_S < <(hf gz-small --runs 6 -S bash "gzip -dc $W/rep-small-1.tgz | openssl dgst -sha256")
read -r GZ_B < <(hf gz-big --runs 6 -S bash "gzip -dc $W/rep-big-1.tgz | openssl dgst -sha256")
HWM=$(awk '/VmHWM/{print $2}' /proc/$PID/status)
hit=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Kernel-Version: $KVER" --data-binary @"$W/rep-big-1.tgz" "$URL")

ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
{
echo "kiln kmod benchmark  ($(date -u +%F), $(nproc) cores, kernel headers $KVER)"
printf '%-46s %10s %10s %8s\n' measure kiln baseline ratio
printf '%-46s %9ss %9ss %8s\n' "cache hit, same bytes, Debian $(du -h "$H"|cut -f1)" "$SAME_S" "$BASE_S" "$(ratio "$SAME_S" "$BASE_S")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, same bytes, synthetic $(du -h "$BIG"|cut -f1)" "$SAME_B" "$BASE_B" "$(ratio "$SAME_B" "$BASE_B")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, same bytes, kiln CLI, Debian" "$CLI_S" "$BASE_S" "$(ratio "$CLI_S" "$BASE_S")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, same bytes, kiln CLI, synthetic" "$CLI_B" "$BASE_B" "$(ratio "$CLI_B" "$BASE_B")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, digest declared, Debian" "$DECL_S" "$BASE_S" "$(ratio "$DECL_S" "$BASE_S")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, digest declared, synthetic" "$DECL_B" "$BASE_B" "$(ratio "$DECL_B" "$BASE_B")"
printf '%-46s %9ss %9ss %8s\n' "  floor: curl to a do-nothing sink, Debian" "$FLOOR_S" "$BASE_S" "$(ratio "$FLOOR_S" "$BASE_S")"
printf '%-46s %9ss %9ss %8s\n' "  floor: curl to a do-nothing sink, synthetic" "$FLOOR_B" "$BASE_B" "$(ratio "$FLOOR_B" "$BASE_B")"
printf '%-46s %9ss %9ss %8s\n' "  kiln hit vs that floor, Debian / synthetic" "$SAME_S" "$FLOOR_S" "$(ratio "$SAME_S" "$FLOOR_S") / $(ratio "$SAME_B" "$FLOOR_B")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, repacked tree, Debian (vs gzip|dgst)" "$REP_S" "$GZ_S" "$(ratio "$REP_S" "$GZ_S")"
printf '%-46s %9ss %9ss %8s\n' "cache hit, repacked tree, synthetic" "$REPB_S" "$GZ_B" "$(ratio "$REPB_S" "$GZ_B")"
printf '%-46s %9ss %9ss %8s\n' "cold build, trees on disk, vs raw make" "$COLD" "$MAKE" "$(ratio "$COLD" "$MAKE")"
printf '%-46s %9ss %9ss %8s\n' "cold build, trees on tmpfs, vs raw make" "$COLDT" "$MAKE" "$(ratio "$COLDT" "$MAKE")"
printf '%-46s %9ss %9ss %8s\n' "rebuild, same headers (?force), vs raw make" "$WARM" "$MAKE2" "$(ratio "$WARM" "$MAKE2")"
echo "  runs (s): cold disk ${CD[*]} | cold tmpfs ${CT[*]} | make ${MK[*]}"
echo "            rebuild ${WB[*]} | make ${MK2[*]}"
printf '%-46s %9s MiB (goal < 100 MiB)\n' "server peak RSS (VmHWM) after 100 MB uploads" "$((HWM/1024))"
echo "(last repacked synthetic request answered HTTP $hit)"
} | tee "$OUT/results.txt"
