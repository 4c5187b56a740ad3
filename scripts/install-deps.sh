#!/usr/bin/env bash
# Installs what `make demo` and `make test` need on a fresh Debian machine, and nothing when it is
# all there. Each entry is "command:package": the command proves the package is installed.
set -euo pipefail
needs=(
  qemu-img:qemu-utils qemu-nbd:qemu-utils qemu-io:qemu-utils
  qemu-system-x86_64:qemu-system-x86
  nbdkit:nbdkit nbdinfo:libnbd-bin
  fusermount3:fuse3 nft:nftables ip:iproute2 losetup:mount
  cpio:cpio gzip:gzip gcc:gcc rsync:rsync
)
missing=()
for entry in "${needs[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0

# Debian's qemu-system-x86 pins qemu-utils to its own version. On machines that carry a newer
# backports qemu-utils (whose source is no longer configured) apt would rather remove it than
# downgrade it, so ask for both at the very version qemu-system-x86 will have.
if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-system-x86\|qemu-utils'; then
  [ "$(id -u)" -eq 0 ] && apt-get update -q >/dev/null
  qemu_version=$(apt-cache madison qemu-system-x86 2>/dev/null | awk 'NR == 1 {print $3}')
  others=()
  for package in "${missing[@]}"; do
    case "$package" in qemu-utils | qemu-system-x86) ;; *) others+=("$package") ;; esac
  done
  missing=("${others[@]}" "qemu-utils${qemu_version:+=$qemu_version}" "qemu-system-x86${qemu_version:+=$qemu_version}")
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages; as root run:" >&2
  echo "  apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
