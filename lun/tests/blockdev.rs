//! The block device backend on real loop devices with 512- and 4096-byte logical sectors.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lun::{
    AlignedBuf, Backing, CompareAndWrite, FileLun, IoEngine, IoRequest, Lun, LunError, OpenOptions,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A loop device over a sparse file, detached when dropped, even if the test fails.
struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn attach(sector_size: u32) -> Option<LoopDevice> {
        let available = lun::prereq::is_root()
            && lun::prereq::have_command("losetup")
            && Path::new("/dev/loop-control").exists();
        if !lun::prereq::require(
            available,
            "root, losetup and /dev/loop-control for loop devices",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let output = Command::new("losetup")
            .args(["--sector-size", &sector_size.to_string(), "-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let device = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        Some(LoopDevice {
            device,
            backing,
            _dir: dir,
        })
    }

    fn spec(&self) -> &str {
        self.device.to_str().unwrap()
    }

    fn backing_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.backing)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.device).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not detach {}", self.device.display());
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// Geometry, direct-I/O round trips through both engines, batches, zeroing and
/// compare-and-write, with the data checked in the loop device's backing file.
fn exercise(sector: u32) {
    let Some(dev) = LoopDevice::attach(sector) else {
        return;
    };

    let detected = lun::open(dev.spec(), &OpenOptions::default()).unwrap();
    assert_eq!(detected.name(), format!("blockdev:{}", dev.spec()));
    assert_eq!(detected.sector_size(), sector);
    assert_eq!(detected.size(), SIZE);
    assert!(detected.supports_compare_and_write());
    drop(detected);

    for (round, engine) in [IoEngine::Sync, IoEngine::Uring].into_iter().enumerate() {
        let lun = FileLun::open_with(
            &dev.device,
            &OpenOptions {
                engine,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(lun.backing(), Backing::BlockDevice);
        assert!(
            lun.is_direct(),
            "block devices always bypass the page cache"
        );
        assert_eq!(lun.io_engine(), engine);
        let seed = round as u8 * 50;
        let s = sector as usize;

        // Ordinary (unaligned) Vec memory, bounced.
        let data = pattern(3 * s, seed);
        let offset = 5 * u64::from(sector);
        lun.write_at(&data, offset).unwrap();
        let mut back = vec![0u8; data.len()];
        lun.read_at(&mut back, offset).unwrap();
        assert_eq!(back, data);

        // Page-aligned memory goes to the device without a bounce copy.
        let mut big = AlignedBuf::new(3 * MIB as usize);
        big.copy_from_slice(&pattern(3 * MIB as usize, seed + 1));
        lun.write_at(&big, 8 * MIB).unwrap();
        let mut big_back = AlignedBuf::new(big.len());
        lun.read_at(&mut big_back, 8 * MIB).unwrap();
        assert!(big_back[..] == big[..]);

        let a = pattern(s, seed + 2);
        let b = pattern(2 * s, seed + 3);
        let mut batch = [
            IoRequest::Write {
                buf: &a,
                offset: 20 * MIB,
            },
            IoRequest::Write {
                buf: &b,
                offset: 21 * MIB,
            },
        ];
        lun.submit(&mut batch).unwrap();
        lun.flush().unwrap();

        assert_eq!(
            dev.backing_bytes(offset, data.len()),
            data,
            "data reached the device"
        );
        assert!(dev.backing_bytes(8 * MIB, big.len()) == big[..]);
        assert_eq!(dev.backing_bytes(20 * MIB, s), a);
        assert_eq!(dev.backing_bytes(21 * MIB, 2 * s), b);

        // BLKZEROOUT.
        lun.write_zeroes(8 * MIB + MIB, MIB).unwrap();
        lun.read_at(&mut big_back, 8 * MIB).unwrap();
        assert!(big_back[..MIB as usize] == big[..MIB as usize]);
        assert!(
            big_back[MIB as usize..2 * MIB as usize]
                .iter()
                .all(|&x| x == 0)
        );
        assert!(big_back[2 * MIB as usize..] == big[2 * MIB as usize..]);
        lun.flush().unwrap();
        assert!(
            dev.backing_bytes(9 * MIB, MIB as usize)
                .iter()
                .all(|&x| x == 0)
        );

        let new = pattern(s, seed + 4);
        assert_eq!(
            lun.compare_and_write(&a, &new, 20 * MIB).unwrap(),
            CompareAndWrite::Written
        );
        assert_eq!(
            lun.compare_and_write(&a, &pattern(s, 9), 20 * MIB).unwrap(),
            CompareAndWrite::Miscompare(new.clone())
        );
    }

    let read_only = lun::open(
        dev.spec(),
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        read_only.write_at(&vec![0u8; sector as usize], 0),
        Err(LunError::ReadOnly { .. })
    ));
}

#[test]
fn loop_device_with_512_byte_sectors() {
    exercise(512);
}

#[test]
fn loop_device_with_4096_byte_sectors() {
    exercise(4096);
}

#[test]
fn a_4k_device_refuses_512_byte_io_and_512_byte_geometry() {
    let Some(dev) = LoopDevice::attach(4096) else {
        return;
    };
    let lun = lun::open(dev.spec(), &OpenOptions::default()).unwrap();
    let err = lun.write_at(&[1u8; 512], 0).unwrap_err();
    assert!(
        matches!(
            err,
            LunError::Misaligned {
                sector_size: 4096,
                ..
            }
        ),
        "{err}"
    );
    let err = lun.read_at(&mut [0u8; 4096], 512).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    assert!(
        dev.backing_bytes(0, 4096).iter().all(|&x| x == 0),
        "nothing was written"
    );

    let err = lun::open(
        dev.spec(),
        &OpenOptions {
            sector_size: Some(512),
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(dev.spec()) && msg.contains("4096"), "{msg}");

    // A larger multiple of the device's sector is a valid (stricter) geometry.
    let coarse = lun::open(
        dev.spec(),
        &OpenOptions {
            sector_size: Some(8192),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(coarse.sector_size(), 8192);
    assert!(matches!(
        coarse.write_at(&[0u8; 4096], 0),
        Err(LunError::Misaligned { .. })
    ));
}
