#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   installs what the tests need, prepares the shared fixtures (real Debian
#   kernel headers of a kernel that is NOT installed here), then runs every
#   test with nextest (or cargo test) so the run ends on the runner's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
for p in bubblewrap kmod make gcc git curl openssl bc flex bison libelf-dev dpkg-dev python3 ca-certificates lintian patch xz-utils binutils apt-utils qemu-utils kubectl thin-provisioning-tools lvm2 python3-venv util-linux buildah skopeo docker-registry busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 1; }

# S3 for the provisioning tests: moto in server mode, from PyPI, in a venv.
VENV="${KILN_TEST_VENV:-/var/cache/kiln-test-venv}"
if [ ! -x "$VENV/bin/moto_server" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'moto[server]'
fi
export KILN_TEST_MOTO="$VENV/bin/moto_server"

# Fixtures: Debian linux-headers for the newest 6.1.0-*-amd64, fetched with
# apt-get download and unpacked with dpkg-deb -x, never installed.
FIX="${KILN_TEST_FIXTURES:-$PWD/target/kiln-fixtures}"
export KILN_TEST_FIXTURES="$FIX"
if [ ! -f "$FIX/ready" ]; then
  rm -rf "$FIX"; mkdir -p "$FIX/debs" "$FIX/root"
  apt-get update -qq
  pkg=$(apt-cache search --names-only '^linux-headers-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -1)
  [ -n "$pkg" ] || { echo "no linux-headers-6.1.0-*-amd64 package found"; exit 1; }
  kver=${pkg#linux-headers-}
  if [ -e "/usr/src/linux-headers-$kver" ] || [ "$(uname -r)" = "$kver" ]; then
    echo "warning: $kver is installed on this machine; the tests still use only the unpacked copy"
  fi
  kbuild=$(apt-cache depends "$pkg" | sed -n 's/.*Depends: \(linux-kbuild-[0-9.]*\).*/\1/p' | head -1)
  common=$(apt-cache depends "$pkg" | sed -n 's/.*Depends: \(linux-headers-[0-9.-]*-common\).*/\1/p' | head -1)
  (cd "$FIX/debs" && apt-get download -qq "$pkg" "$common" "$kbuild" 2>/dev/null)
  for d in "$FIX"/debs/*.deb; do dpkg-deb -x "$d" "$FIX/root"; done
  kb=$(basename "$(ls -d "$FIX"/root/usr/lib/linux-kbuild-*)")
  # Packed exactly as a Debian node packs its own headers.
  tar czf "$FIX/headers.tgz" -C "$FIX/root" "usr/src/linux-headers-$kver" "usr/src/linux-headers-${kver%-amd64}-common" "usr/lib/$kb"
  echo "$kver" > "$FIX/kver"
  echo "$kb" > "$FIX/kbuild"
  touch "$FIX/ready"
fi
echo "fixtures: $FIX (kernel $(cat "$FIX/kver"))"

cargo build --workspace --all-targets --locked 2>&1 | tail -3
if command -v cargo-nextest >/dev/null; then
  exec cargo nextest run --workspace --locked --no-fail-fast --test-threads 4
else
  exec cargo test --workspace --locked --no-fail-fast
fi
