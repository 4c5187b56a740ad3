#!/usr/bin/env bash
# Fetches the guest pieces the tests boot, from Debian packages, without installing them on the
# host: the Debian cloud kernel (vmlinuz plus the virtio modules, which that kernel builds as
# modules) and a static busybox. Output: build/guest/{vmlinuz,busybox,modules/*.ko}.
# Idempotent: does nothing when the files are already there.
set -euo pipefail
out="${1:-build/guest}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -s "$out/vmlinuz" ] && [ -s "$out/busybox" ] && [ -s "$out/modules/virtio_blk.ko" ] && exit 0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { echo "guest-assets: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
# apt-get download drops privileges to _apt; a private directory it cannot write to only warns.
apt-get download -q "$kernel_pkg" busybox-static >/dev/null 2>&1 ||
  { echo "guest-assets: apt-get download $kernel_pkg busybox-static failed" >&2; exit 1; }
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox

cp kernel/boot/vmlinuz-* "$out/vmlinuz"
cp busybox/bin/busybox "$out/busybox"
mkdir -p "$out/modules"
wanted="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_blk"
for m in $wanted; do
  find kernel/lib/modules -name "$m.ko" -exec cp {} "$out/modules/" \;
  [ -s "$out/modules/$m.ko" ] || { echo "guest-assets: module $m.ko missing from $kernel_pkg" >&2; exit 1; }
done
# busybox insmod does not resolve dependencies, so write the load order from each module's own
# `depends=` field (it changes between kernel updates: 6.1.0-56's virtio needs virtio_ring).
depends() { tr '\0' '\n' < "$out/modules/$1.ko" | sed -n 's/^depends=//p' | tr ',' ' '; }
order=()
visit() {
  local m=$1 d
  [[ " ${order[*]} " == *" $m "* ]] && return
  for d in $(depends "$m"); do
    [ -s "$out/modules/$d.ko" ] || { echo "guest-assets: $m.ko needs $d.ko, which is not fetched" >&2; exit 1; }
    visit "$d"
  done
  order+=("$m")
}
for m in $wanted; do visit "$m"; done
echo "${order[*]}" > "$out/modules/order"
echo "guest-assets: $kernel_pkg and busybox-static in $out (modules: ${order[*]})"
