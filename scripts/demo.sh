#!/usr/bin/env bash
# The main job on a datastore in a local file: format it, lay out a VM folder with a virtual disk,
# copy a file in and out and prove the bytes survived, then show the datastore.
set -euo pipefail
vapp=$(realpath "${1:-target/release/vapp}")
mkdir -p demo
export VAPP_DATASTORE=demo/datastore.vmfs
rm -f "$VAPP_DATASTORE" "$VAPP_DATASTORE.snap"
rm -rf demo/state
# Snapshot pools of block devices are found through a registry; keep the demo's to itself.
export VAPP_STATE_DIR=$PWD/demo/state

step() { printf '\n== %s\n' "$*"; }

step "format a 16 GiB thin datastore in a local file"
"$vapp" datastore format "$VAPP_DATASTORE" --name demo --size 16G

step "a VM folder with a 20 GiB thin virtual disk"
"$vapp" mkdir -p /vms/demo
"$vapp" vdisk create /vms/demo/disk0.vdisk --size 20G

step "copy a file in and out"
head -c 50000000 /dev/urandom > demo/payload.bin
"$vapp" put demo/payload.bin /vms/demo/payload.bin
"$vapp" get /vms/demo/payload.bin demo/payload.out
in=$(sha256sum < demo/payload.bin | cut -d' ' -f1)
out=$(sha256sum < demo/payload.out | cut -d' ' -f1)
[ "$in" = "$out" ] || { echo "demo: MISMATCH: $in != $out" >&2; exit 1; }
echo "sha256 in = out = $in"
"$vapp" ls -l /vms/demo

step "fsck"
"$vapp" datastore fsck "$VAPP_DATASTORE"

step "datastore info"
"$vapp" datastore info "$VAPP_DATASTORE"

step "a VM on the datastore: the test guest kernel (hv/guest), 2 vCPUs, a new 64 MiB disk"
"$vapp" vm test-guest demo/testguest.elf
"$vapp" vm create /vms/testguest --kernel demo/testguest.elf --vcpus 2 --memory 64M \
  --disk 64M --cmdline "mode=test"
"$vapp" vm list

step "snapshot the VM before it boots (all its disks at one point; its pool is inside the datastore)"
"$vapp" vm snapshot /vms/testguest before-boot
"$vapp" snapshot list /vms/testguest/disk0.vdisk

step "boot it from the datastore: its serial console, then how it ended"
status=0
"$vapp" vm start /vms/testguest || status=$?
echo "vm start exit status: $status"
[ "$status" = 0 ] || { echo "demo: the guest reported a failure" >&2; exit 1; }
"$vapp" ls -l /vms/testguest

step "the guest wrote its disk; the snapshot still holds the disk as it was, and revert brings it back"
disk_sha() { "$vapp" get "$1" - | sha256sum | cut -d' ' -f1; }
before=$(disk_sha /vms/testguest/disk0.vdisk@before-boot)
after=$(disk_sha /vms/testguest/disk0.vdisk)
echo "disk0 now:         $after"
echo "disk0@before-boot: $before"
[ "$before" != "$after" ] || { echo "demo: the guest did not change its disk" >&2; exit 1; }
"$vapp" vm revert /vms/testguest before-boot
reverted=$(disk_sha /vms/testguest/disk0.vdisk)
echo "disk0 reverted:    $reverted"
[ "$reverted" = "$before" ] || { echo "demo: revert did not restore the disk" >&2; exit 1; }

step "a snapshot of the whole datastore LUN is a copy: read-only as it is, its own datastore once resignatured"
# Whole-LUN commands take the LUN itself, so without the VAPP_DATASTORE that names it for -d.
lun_cmd() { env -u VAPP_DATASTORE "$vapp" "$@"; }
lun_cmd snapshot create "$VAPP_DATASTORE" demo-point --writable
"$vapp" datastore info "$VAPP_DATASTORE@demo-point" | grep -E '^(datastore|copy)'
"$vapp" datastore resignature "$VAPP_DATASTORE@demo-point" --name demo-copy
"$vapp" -d "$VAPP_DATASTORE@demo-point" mkdir /only-in-the-copy
echo "copy:     $("$vapp" -d "$VAPP_DATASTORE@demo-point" ls / | tr '\n' ' ')"
echo "original: $("$vapp" ls / | tr '\n' ' ')"
"$vapp" datastore fsck "$VAPP_DATASTORE@demo-point"
lun_cmd snapshot delete "$VAPP_DATASTORE" demo-point

step "replication: two sites on this host over 127.0.0.1, a datastore written through the primary"
# Each site has its own registry and runtime directory, as two machines would.
site_a() { env -u VAPP_DATASTORE VAPP_STATE_DIR="$PWD/demo/site-a" VAPP_RUNTIME_DIR="$PWD/demo/run-a" "$vapp" "$@"; }
site_b() { env -u VAPP_DATASTORE VAPP_STATE_DIR="$PWD/demo/site-b" VAPP_RUNTIME_DIR="$PWD/demo/run-b" "$vapp" "$@"; }
# A demo stopped half-way left its daemons running: end them first.
site_a replica delete demo/a.lun >/dev/null 2>&1 || true
site_b replica delete demo/b.lun >/dev/null 2>&1 || true
rm -rf demo/a.lun* demo/b.lun* demo/site-a demo/site-b demo/run-a demo/run-b
truncate -s 256M demo/a.lun demo/b.lun
head -c 16000000 demo/payload.bin > demo/repl-payload.bin
head -c 32 /dev/urandom | base64 > demo/repl.secret
chmod 600 demo/repl.secret
site_b replica create demo/b.lun --role secondary --listen 127.0.0.1:17788 --peer 127.0.0.1:17789 \
  --secret-file demo/repl.secret
site_a replica create demo/a.lun --role primary --listen 127.0.0.1:17789 --peer 127.0.0.1:17788 \
  --secret-file demo/repl.secret
site_a datastore format demo/a.lun --name replicated | sed -n 1p
site_a -d demo/a.lun put demo/repl-payload.bin /payload.bin
for _ in $(seq 100); do
  [ "$(site_a replica status demo/a.lun --json | grep -c '"out_of_sync_bytes": 0')" = 1 ] && break
  sleep 0.1
done
site_a replica status
site_b replica status
echo "fractured, a write at the primary is tracked; resume copies only what changed:"
site_a replica fracture demo/a.lun
site_a -d demo/a.lun mkdir /written-while-fractured
site_a replica status demo/a.lun
site_a replica resume demo/a.lun
for _ in $(seq 100); do
  [ "$(site_a replica status demo/a.lun --json | grep -c '"out_of_sync_bytes": 0')" = 1 ] && break
  sleep 0.1
done
site_a replica status demo/a.lun --json | grep -E '"(link|bytes_resynced)"'
cmp demo/a.lun demo/b.lun && echo "the replica equals the primary, byte for byte"
site_b -d demo/b.lun mkdir /not-here 2>&1 | sed 's/^/refused on the secondary: /' || true

step "DR drill: site B starts the replicated VM from a copy of the replica while replication runs"
site_a vm test-guest demo/dr-guest.elf
site_a -d demo/a.lun vm create /vms/app --kernel demo/dr-guest.elf --vcpus 1 --memory 64M \
  --cmdline mode=wait | sed -n 1p
printf '%s\n' 'name = "demo"' 'rpo_target_s = 60' 'rto_target_s = 120' \
  '[[replica]]' 'lun = "demo/b.lun"' '[[datastore]]' 'name = "replicated"' 'lun = "demo/b.lun"' \
  '[[vm]]' 'path = "/vms/app"' 'datastore = "replicated"' 'verify.ready = true' > demo/dr-plan.toml
site_b dr validate demo/dr-plan.toml
site_b dr test demo/dr-plan.toml --report demo/dr-report.html
site_b dr cleanup demo/dr-plan.toml
site_b dr history demo/dr-plan.toml
for _ in $(seq 100); do
  [ "$(site_a replica status demo/a.lun --json | grep -c '"out_of_sync_bytes": 0')" = 1 ] && break
  sleep 0.1
done
cmp demo/a.lun demo/b.lun && echo "the drill never wrote the replica: it still equals the primary"
echo "the drill's report: demo/dr-report.html"
site_a replica delete demo/a.lun
site_b replica delete demo/b.lun
