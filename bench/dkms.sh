#!/usr/bin/env bash
# kiln dkms2bin against stock `dkms build` (3.0.10), same packages, same
# kernel headers, same machine, in one run:
#   one package     dkms build acpi-call           vs kiln dkms2bin (one build)
#   three packages  dkms build x3, one after another vs kiln -j1 (sequential)
#                                                    and kiln -j3 (in parallel)
# dkms builds (make -j$(nproc)) and stops; kiln also strips, packages a
# lintian-clean .deb per package and writes the apt index. Median of ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
FIX="${KILN_TEST_FIXTURES:-$PWD/target/kiln-fixtures}"
[ -f "$FIX/ready" ] || { echo "run ./scripts/test.sh first (it prepares $FIX)"; exit 1; }
command -v dkms >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends dkms >/dev/null; }
ROUNDS="${ROUNDS:-3}"
K=$(cat "$FIX/kver")
OUT="$PWD/bench/out"; mkdir -p "$OUT"
W=$(mktemp -d /var/tmp/kiln-bench-dkms.XXXXXX); trap 'rm -rf "$W"' EXIT
cargo build --release -p kiln 2>&1 | tail -1
BIN="$PWD/target/release/kiln"

# One headers tree both use: the Debian tree with its -common include pointed at the copy.
cp -a "$FIX/root" "$W/root"
sed -i "s|include /usr/src/|include $W/root/usr/src/|" "$W/root/usr/src/linux-headers-$K/Makefile"
TREE="$W/root/usr/src/linux-headers-$K"
PKGS=(acpi-call-dkms bbswitch-dkms v4l2loopback-dkms)
mkdir -p "$W/debs" "$W/src"
(cd "$W/debs" && apt-get download -q "${PKGS[@]}" >/dev/null 2>&1)
declare -A MV
for deb in "$W"/debs/*.deb; do
  dpkg-deb -x "$deb" "$W/x"
done
cp -a "$W"/x/usr/src/* "$W/src/"
for d in "$W"/src/*/; do
  n=$(bash -c '. "$1"/dkms.conf >/dev/null 2>&1; echo "$PACKAGE_NAME/$PACKAGE_VERSION"' _ "$d")
  MV[$(basename "$d")]=$n
done

now() { date +%s.%N; }
dkms_one() { # name/version
  rm -rf "$W/dt"; mkdir -p "$W/dt"
  dkms build -m "${1%/*}" -v "${1#*/}" -k "$K" --kernelsourcedir "$TREE" \
    --sourcetree "$W/src" --dkmstree "$W/dt" >>"$W/dkms.log" 2>&1
}
kiln_run() { # -j N, then debs
  local j=$1; shift
  rm -rf "$W/out"
  "$BIN" dkms2bin -j "$j" --kver "$K" --headers "$TREE" --out-dir "$W/out" --dkms "$@" >>"$W/kiln.log" 2>&1
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A T
for r in $(seq 1 "$ROUNDS"); do
  t=$(now); dkms_one "${MV[acpi-call-1.2.2]}"; T[dkms1]+="$(echo "$(now) - $t" | bc) "
  t=$(now); kiln_run 1 "$W"/debs/acpi-call-dkms_*.deb; T[kiln1]+="$(echo "$(now) - $t" | bc) "
  t=$(now); for m in "${MV[@]}"; do dkms_one "$m"; done; T[dkms3]+="$(echo "$(now) - $t" | bc) "
  t=$(now); kiln_run 1 "$W"/debs/*.deb; T[kiln3s]+="$(echo "$(now) - $t" | bc) "
  t=$(now); kiln_run 3 "$W"/debs/*.deb; T[kiln3p]+="$(echo "$(now) - $t" | bc) "
done
ls "$W/out"/*.deb | wc -l | grep -qx 3 || { echo "kiln did not produce 3 packages"; tail -30 "$W/kiln.log"; exit 1; }
m() { echo "${T[$1]}" | median; }
{
  printf '%-44s %8s %8s\n' case "sec(med)" "vs dkms"
  printf '%-44s %8.2f %8s\n' "1 package: dkms build" "$(m dkms1)" 1.00
  printf '%-44s %8.2f %8.2f\n' "1 package: kiln dkms2bin (+ .deb + index)" "$(m kiln1)" "$(echo "$(m kiln1) / $(m dkms1)" | bc -l)"
  printf '%-44s %8.2f %8s\n' "3 packages: dkms build, one after another" "$(m dkms3)" 1.00
  printf '%-44s %8.2f %8.2f\n' "3 packages: kiln dkms2bin -j1" "$(m kiln3s)" "$(echo "$(m kiln3s) / $(m dkms3)" | bc -l)"
  printf '%-44s %8.2f %8.2f\n' "3 packages: kiln dkms2bin -j3" "$(m kiln3p)" "$(echo "$(m kiln3p) / $(m dkms3)" | bc -l)"
  echo "rounds: $ROUNDS on $(nproc) cores; kernel $K; packages ${PKGS[*]}; raw: ${T[*]}"
} | tee "$OUT/dkms.txt"
