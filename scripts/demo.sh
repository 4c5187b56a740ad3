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

step "HA: two host agents on one datastore; kill -9 one with its VM, the other restarts the VM"
ha=$PWD/demo/ha.vmfs
rm -rf "$ha" demo/run-esx-a demo/run-esx-b
# Each agent is its own host of the datastore: its own name, host id and runtime directory.
# `env` execs vapp, so in the background $! is the agent itself and its children its VMs' runners.
host_as() {
  local h=$1 n=$2; shift 2
  env VAPP_HOST_NAME="$h" VAPP_HOST_UUID="$n$n$n$n-0000-4000-8000-0000000000$n" \
    VAPP_RUNTIME_DIR="$PWD/demo/run-$h" "$vapp" -d "$ha" "$@"
}
esx_a() { host_as esx-a a1 "$@"; }
esx_b() { host_as esx-b b2 "$@"; }
# A 250 ms I/O timeout makes the dead-host time 2 s, so the demo does not wait the default 16 s.
esx_a datastore format "$ha" --name ha --size 1G --io-timeout 250ms
esx_a vm create /vms/web --kernel demo/testguest.elf --vcpus 1 --memory 64M --cmdline mode=wait \
  --disk 1M --ha high | sed -n 1p
agents=()
trap 'kill "${agents[@]}" 2>/dev/null || true' EXIT
for h in esx-a esx-b; do
  mkdir -p "demo/run-$h"
  printf 'name = "%s"\ndatastores = ["%s"]\nruntime_dir = "%s"\n' "$h" "$ha" "$PWD/demo/run-$h" \
    > "demo/$h.toml"
done
env VAPP_HOST_NAME=esx-a VAPP_HOST_UUID=a1a1a1a1-0000-4000-8000-0000000000a1 \
  VAPP_RUNTIME_DIR="$PWD/demo/run-esx-a" "$vapp" -d "$ha" host run --config demo/esx-a.toml \
  >/dev/null 2>demo/esx-a.log &
agent_a=$!
env VAPP_HOST_NAME=esx-b VAPP_HOST_UUID=b2b2b2b2-0000-4000-8000-0000000000b2 \
  VAPP_RUNTIME_DIR="$PWD/demo/run-esx-b" "$vapp" -d "$ha" host run --config demo/esx-b.toml \
  >/dev/null 2>demo/esx-b.log &
agent_b=$!
agents=("$agent_a" "$agent_b")
for _ in $(seq 100); do
  [ -S demo/run-esx-a/agent.sock ] && [ -S demo/run-esx-b/agent.sock ] && break
  sleep 0.1
done
esx_a vm start /vms/web
esx_a vm list
echo "kill -9 esx-a's agent and its VM:"
runner=$(pgrep -P "$agent_a" || true)
kill -9 "$agent_a" $runner
wait "$agent_a" 2>/dev/null || true
start=$(date +%s.%N)
for _ in $(seq 300); do
  esx_b vm list --json | grep -q '"host": "esx-b"' && break
  sleep 0.1
done
printf 'running again on esx-b %.1f s after the kill (dead-host time 2 s, plus the boot)\n' \
  "$(echo "$(date +%s.%N) - $start" | bc)"
esx_b vm list
esx_b host events | grep -E 'host-dead|vm-restarted'
kill -TERM "$agent_b"
wait "$agent_b" 2>/dev/null || true
agents=()

step "networking: two VMs on an isolated network ping each other"
# On the HA datastore: demo/datastore.vmfs has LUN snapshots, so only one process may write it.
"$vapp" host network delete demo 2>/dev/null || true
"$vapp" host network create demo --isolated
for i in 1 2; do
  "$vapp" -d "$ha" vm create "/vms/ping$i" --kernel demo/testguest.elf --vcpus 1 --memory 64M \
    --cmdline "net_ip=10.99.0.$i net_ping=10.99.0.$((3 - i)) net_count=3" --net demo | sed -n 1p
  "$vapp" -d "$ha" vm start "/vms/ping$i" --foreground --console-log "demo/ping$i.console" \
    >/dev/null 2>&1 &
  agents+=($!)
done
for _ in $(seq 300); do
  grep -q "3 sent" demo/ping1.console 2>/dev/null && grep -q "3 sent" demo/ping2.console 2>/dev/null \
    && break
  sleep 0.1
done
grep -h "net: ping" demo/ping1.console demo/ping2.console
for i in 1 2; do "$vapp" -d "$ha" vm stop "/vms/ping$i" >/dev/null; done
wait "${agents[@]}" 2>/dev/null || true
agents=()
"$vapp" host network delete demo

step "resources: this host's CPU topology, and admission control refusing an over-reservation"
"$vapp" host info | grep -iE 'topology|cores|threads'
cores=$(nproc)
"$vapp" vm create /vms/greedy --kernel demo/testguest.elf --vcpus "$cores" --memory 64M | sed -n 1p
"$vapp" get /vms/greedy/vm.toml demo/greedy.toml
# Every vCPU reserved a whole core: more than the host keeps for VMs after its own reserve.
printf '\n[resources.cpu]\nreservation = "%s%%"\n' "$((cores * 100))" >> demo/greedy.toml
"$vapp" put demo/greedy.toml /vms/greedy/vm.toml
"$vapp" vm start /vms/greedy --foreground 2>&1 | sed 's/^/refused: /' || true

step "raw device mappings: a whole LUN (a 4 KiB-sector loop device) mapped into the datastore"
for dev in $(losetup -j "$PWD/demo/rdm.lun" -O NAME -n 2>/dev/null); do losetup -d "$dev"; done
rm -f demo/rdm.lun demo/rdm-other.lun
truncate -s 64M demo/rdm.lun demo/rdm-other.lun
device=$(losetup -f --show --sector-size 4096 demo/rdm.lun)
"$vapp" mkdir -p /vms/db
"$vapp" rdm create /vms/db/data.rdm --lun "$device" --mode physical
"$vapp" ls -l /vms/db
"$vapp" rdm show /vms/db/data.rdm
echo "the device detached and attached again elsewhere: the mapping finds it by its identity"
losetup -d "$device"
# The kernel detaches a loop device on its last close: wait for it, as udev may still hold it.
for _ in $(seq 100); do [ -z "$(losetup -j "$PWD/demo/rdm.lun")" ] && break; sleep 0.05; done
other=$(losetup -f --show demo/rdm-other.lun)
device=$(losetup -f --show --sector-size 4096 demo/rdm.lun)
echo "now $device (was taken by $other)"
"$vapp" rdm verify /vms/db/data.rdm
"$vapp" snapshot create /vms/db/data.rdm before 2>&1 | sed 's/^/refused: /' || true
losetup -d "$device" "$other"
