//! virtio-blk from the guest's side: patterns both ways, flushes that make writes durable,
//! and every error path answered with the virtio status the guest must see.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{disk, guest_config, kvm_available, pattern_disk, run_to_end};
use hv::test_guest::{
    DISCARD_OFFSET, GUEST_PATTERN_OFFSET, PATTERN_BYTES, guest_pattern, host_pattern, status,
};
use hv::{Disk, VmExit};
use lun::fault::{CrashMode, FaultLun};
use lun::{FileLun, Lun, OpenOptions};

fn read(lun: &dyn Lun, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PATTERN_BYTES];
    lun.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn guest_reads_what_the_host_wrote_and_the_host_reads_what_the_guest_wrote() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let luns: Vec<_> = (0..3).map(|i| pattern_disk(&dir, i, 8 << 20)).collect();
    let (mut config, console) = guest_config("patterns", 2, "");
    config.disks = luns.iter().map(disk).collect();
    let (exit, out) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "console:\n{out}");
    for (i, lun) in luns.iter().enumerate() {
        assert!(
            out.contains(&format!(
                "disk {i}: 16384 sectors, block size 512, read-write"
            )),
            "{out}"
        );
        assert!(out.contains(&format!("disk {i}: host pattern ok")), "{out}");
        assert_eq!(
            read(lun.as_ref(), GUEST_PATTERN_OFFSET),
            guest_pattern(i as u32),
            "disk {i}"
        );
    }
}

#[test]
fn guest_detects_data_that_is_not_what_the_host_wrote() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = pattern_disk(&dir, 0, 1 << 20);
    // One corrupted byte in the middle of the pattern.
    let mut corrupt = host_pattern(0);
    corrupt[2000] ^= 0x40;
    lun.write_at(&corrupt, 0).unwrap();
    let (mut config, console) = guest_config("corrupt", 1, "");
    config.disks.push(disk(&lun));
    let (exit, out) = run_to_end(config, &console);
    assert!(
        out.contains("disk 0: host pattern MISMATCH at byte 2000"),
        "{out}"
    );
    assert_eq!(
        exit,
        VmExit::PowerOff {
            status: status::HOST_PATTERN
        },
        "{out}"
    );
}

#[test]
fn a_blank_disk_is_new_the_guest_writes_its_pattern_on_it() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = Arc::new(FileLun::create(&dir.path().join("blank.img"), 1 << 20).unwrap());
    let (mut config, console) = guest_config("blank", 1, "");
    config.disks.push(disk(&lun));
    let (exit, out) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
    assert!(
        out.contains("disk 0: blank, no host pattern to check"),
        "{out}"
    );
    assert!(out.contains("split read status=0 matches"), "{out}");
    assert_eq!(read(lun.as_ref(), GUEST_PATTERN_OFFSET), guest_pattern(0));
}

#[test]
fn a_4k_sector_lun_is_offered_with_its_block_size() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let options = OpenOptions {
        sector_size: Some(4096),
        ..OpenOptions::default()
    };
    let lun =
        Arc::new(FileLun::create_with(&dir.path().join("4k.img"), 1 << 20, &options).unwrap());
    lun.write_at(&host_pattern(0), 0).unwrap();
    let (mut config, console) = guest_config("4k", 1, "");
    config.disks.push(disk(&lun));
    let (exit, out) = run_to_end(config, &console);
    assert!(
        out.contains("disk 0: 2048 sectors, block size 4096"),
        "{out}"
    );
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
    assert_eq!(read(lun.as_ref(), GUEST_PATTERN_OFFSET), guest_pattern(0));
}

/// Runs the test guest on a LUN that loses every write since the last flush when "power" is
/// cut after the guest has finished; returns the guest's exit and the console.
fn run_then_cut_power(fault: &Arc<FaultLun>) -> (VmExit, String) {
    let (mut config, console) = guest_config("durable", 1, "");
    config.disks.push(Disk::new(fault.clone() as Arc<dyn Lun>));
    let (exit, _) = run_to_end(config, &console);
    fault.crash().unwrap();
    (exit, console.contents())
}

#[test]
fn a_flushed_guest_write_survives_a_power_cut() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inner = pattern_disk(&dir, 0, 1 << 20);
    inner.flush().unwrap();
    let fault = Arc::new(FaultLun::new(inner.clone() as Arc<dyn Lun>));
    fault.set_crash_mode(CrashMode::DropUnflushed);
    let (exit, out) = run_then_cut_power(&fault);
    assert!(
        out.contains("guest pattern written, flushed, read back"),
        "{out}"
    );
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
    assert_eq!(read(inner.as_ref(), GUEST_PATTERN_OFFSET), guest_pattern(0));
}

#[test]
fn a_failed_flush_is_reported_to_the_guest_and_its_write_is_not_durable() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inner = pattern_disk(&dir, 0, 1 << 20);
    inner.flush().unwrap();
    let fault = Arc::new(FaultLun::new(inner.clone() as Arc<dyn Lun>));
    fault.set_crash_mode(CrashMode::DropUnflushed);
    fault.fail_flushes(true);
    let (exit, out) = run_then_cut_power(&fault);
    assert!(
        out.contains("disk 0: flush status=1, read back status=0"),
        "{out}"
    );
    assert_eq!(
        exit,
        VmExit::PowerOff {
            status: status::DISK_IO
        },
        "{out}"
    );
    assert_eq!(
        read(inner.as_ref(), GUEST_PATTERN_OFFSET),
        vec![0u8; PATTERN_BYTES]
    );
}

#[test]
fn lun_errors_reach_the_guest_as_ioerr() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inner = pattern_disk(&dir, 0, 1 << 20);
    let fault = Arc::new(FaultLun::new(inner as Arc<dyn Lun>));
    fault.fail_writes(GUEST_PATTERN_OFFSET..GUEST_PATTERN_OFFSET + 512);
    let (mut config, console) = guest_config("ioerr", 1, "");
    config.disks.push(Disk::new(fault.clone() as Arc<dyn Lun>));
    let (exit, out) = run_to_end(config, &console);
    assert!(out.contains("disk 0: host pattern ok"), "{out}");
    assert!(out.contains("disk 0: write failed status=1"), "{out}");
    assert_eq!(
        exit,
        VmExit::PowerOff {
            status: status::DISK_IO
        },
        "{out}"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_with_ioerr_and_keeps_its_data() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = pattern_disk(&dir, 0, 1 << 20);
    let (mut config, console) = guest_config("ro", 1, "");
    config
        .disks
        .push(Disk::read_only(lun.clone() as Arc<dyn Lun>));
    let (exit, out) = run_to_end(config, &console);
    assert!(
        out.contains("disk 0: 2048 sectors, block size 512, read-only"),
        "{out}"
    );
    assert!(out.contains("disk 0: host pattern ok"), "{out}");
    assert!(
        out.contains("disk 0: write to read-only disk status=1"),
        "{out}"
    );
    // The guest counts IOERR on a read-only disk as the right answer.
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
    assert_eq!(
        read(lun.as_ref(), GUEST_PATTERN_OFFSET),
        vec![0u8; PATTERN_BYTES]
    );
}

#[test]
fn out_of_range_and_unknown_requests_get_ioerr_and_unsupp() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = pattern_disk(&dir, 0, 1 << 20);
    let (mut config, console) = guest_config("errors", 1, "");
    config.disks.push(disk(&lun));
    let (exit, out) = run_to_end(config, &console);
    assert!(out.contains("disk 0: out-of-range read status=1"), "{out}");
    assert!(
        out.contains("disk 0: unknown request type status=2"),
        "{out}"
    );
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
}

#[test]
fn the_guest_reads_the_serial_given_to_its_disk_and_the_slot_name_otherwise() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let luns: Vec<_> = (0..2).map(|i| pattern_disk(&dir, i, 1 << 20)).collect();
    let (mut config, console) = guest_config("serial", 1, "");
    let mut named = disk(&luns[0]);
    // 20 bytes, the most GET_ID carries: the guest sees no terminating NUL.
    named.serial = Some("WD-WX12A3456789ABCDE".into());
    config.disks = vec![named, disk(&luns[1])];
    let (exit, out) = run_to_end(config, &console);
    assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
    assert!(
        out.contains("disk 0: id \"WD-WX12A3456789ABCDE\" status=0"),
        "{out}"
    );
    assert!(out.contains("disk 1: id \"vapp-disk1\" status=0"), "{out}");
}

#[test]
fn a_serial_longer_than_get_id_carries_is_refused_before_the_guest_runs() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = pattern_disk(&dir, 0, 1 << 20);
    let (mut config, _console) = guest_config("long-serial", 1, "");
    let mut named = disk(&lun);
    named.serial = Some("a-serial-of-21-bytes!".into());
    config.disks.push(named);
    let Err(error) = hv::Vm::create(config) else {
        panic!("a 21-byte serial was accepted");
    };
    let error = error.to_string();
    assert!(
        error.contains("disk 0") && error.contains("a-serial-of-21-bytes!"),
        "{error}"
    );
}

#[test]
fn a_guest_discard_zeroes_its_range_and_gives_the_space_back_only_where_allowed() {
    if !kvm_available() {
        return;
    }
    for sector_size in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let options = OpenOptions {
            sector_size: Some(sector_size),
            ..OpenOptions::default()
        };
        let paths: Vec<_> = (0..2)
            .map(|i| dir.path().join(format!("d{i}.img")))
            .collect();
        let luns: Vec<Arc<FileLun>> = (0..2u32)
            .map(|i| {
                let lun =
                    Arc::new(FileLun::create_with(&paths[i as usize], 1 << 20, &options).unwrap());
                lun.write_at(&host_pattern(i), 0).unwrap();
                lun.write_at(&[0xa5; PATTERN_BYTES], DISCARD_OFFSET)
                    .unwrap();
                lun.flush().unwrap();
                lun
            })
            .collect();
        let (mut config, console) = guest_config("discard", 1, "");
        let mut thin = disk(&luns[0]);
        let punch = luns[0].clone();
        thin.discard = Some(Arc::new(move |offset, len| {
            Ok(punch.write_zeroes(offset, len)?)
        }));
        config.disks = vec![thin, disk(&luns[1])];
        let (exit, out) = run_to_end(config, &console);
        assert_eq!(exit, VmExit::PowerOff { status: 0 }, "{out}");
        assert!(
            out.contains("disk 0: discard status=0, reads back zeroes"),
            "{out}"
        );
        assert_eq!(
            read(luns[0].as_ref(), DISCARD_OFFSET),
            vec![0; PATTERN_BYTES]
        );
        assert!(
            !luns[0]
                .may_hold_data(DISCARD_OFFSET, PATTERN_BYTES as u64)
                .unwrap(),
            "{sector_size}-byte sectors: the discarded range is still allocated"
        );
        // The guest's own pattern, next to the range, is untouched.
        assert_eq!(
            read(luns[0].as_ref(), GUEST_PATTERN_OFFSET),
            guest_pattern(0)
        );
        assert!(out.contains("disk 1: no discard offered"), "{out}");
        assert_eq!(
            read(luns[1].as_ref(), DISCARD_OFFSET),
            vec![0xa5; PATTERN_BYTES]
        );
    }
}
