#!/usr/bin/env bash
# Builds a gzip'd cpio initramfs: static busybox, the virtio modules from guest-assets.sh, and the
# given script as /init. /init can run `/load-virtio` to insmod the modules in dependency order.
# Usage: mkinitramfs.sh OUT.cpio.gz INIT_SCRIPT [ASSETS_DIR]
set -euo pipefail
out="$1"; init="$2"; assets="${3:-build/guest}"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$assets/busybox" "$root/bin/busybox"
for applet in sh mount umount insmod mkdir cat echo sync poweroff sleep dd sha256sum ls mknod; do
  ln -s busybox "$root/bin/$applet"
done
cp "$assets"/modules/*.ko "$root/lib/modules/"
{
  echo '#!/bin/sh'
  for m in $(cat "$assets/modules/order"); do echo "insmod /lib/modules/$m.ko"; done
} > "$root/load-virtio"
chmod +x "$root/load-virtio"
cp "$init" "$root/init"
chmod +x "$root/init"
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$out_abs")
