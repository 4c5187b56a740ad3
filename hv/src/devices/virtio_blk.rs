//! virtio-blk backed by any [`Lun`]: reads, writes, flushes, GET_ID and (where the disk
//! gives a way) discards, each answered with the virtio status the guest must see. A flush
//! returns only after [`Lun::flush`], so whatever the guest was told is durable is durable.
//!
//! Data moves between the LUN and guest memory without a copy when the request's buffers are
//! whole LUN sectors and do not overlap; otherwise through a bounce buffer.

use std::sync::Arc;

use lun::{IoRequest, Lun, check_request};
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::virtio_mmio::VirtioDevice;
use crate::config::{Discard, Disk};

pub(crate) const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
const HEADER_LEN: usize = 16;
/// Requests needing a bounce buffer larger than this fail rather than allocate without bound.
const MAX_BOUNCE: usize = 64 << 20;
/// Ranges of one discard request, and 512-byte sectors of one range: bounds on the time a
/// vCPU spends in one request (the guest splits larger discards).
const MAX_DISCARD_SEG: u32 = 32;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// A discard range: le64 sector, le32 sectors, le32 flags.
const DISCARD_RANGE_LEN: usize = 16;
/// virtio_blk_config up to discard_sector_alignment.
const CONFIG_LEN: usize = 48;

#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: u64,
    len: usize,
}

pub(crate) struct Block {
    vm: String,
    name: String,
    lun: Arc<dyn Lun>,
    read_only: bool,
    discard: Option<Discard>,
    config: [u8; CONFIG_LEN],
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    bounce: Vec<u8>,
    clock: Option<Arc<sched::Clock>>,
}

impl Block {
    pub fn new(vm: &str, name: &str, disk: Disk) -> Self {
        let Disk {
            lun,
            read_only,
            clock,
            serial: id,
            discard,
        } = disk;
        let read_only = read_only || lun.is_read_only();
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(lun.size() / SECTOR).to_le_bytes());
        // seg_max: a request's descriptors less its header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&lun.sector_size().to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        // The guest then discards whole LUN sectors, the only ones a device can deallocate.
        let alignment = (u64::from(lun.sector_size()) / SECTOR) as u32;
        config[44..48].copy_from_slice(&alignment.to_le_bytes());
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let id = id.unwrap_or_else(|| format!("vapp-{name}"));
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Block {
            vm: vm.to_string(),
            name: name.to_string(),
            read_only,
            discard: discard.filter(|_| !read_only),
            lun,
            config,
            serial,
            bounce: Vec::new(),
            clock,
        }
    }

    /// Serves one request, given its device-readable buffers then its device-writable ones;
    /// returns the bytes written into guest buffers, status included.
    fn execute(
        &mut self,
        readable: &[Segment],
        writable: &[Segment],
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let Some(status_at) = last_byte(writable) else {
            debug!(vm = %self.vm, disk = %self.name, "request without room for a status byte");
            return 0;
        };
        let mut header = [0u8; HEADER_LEN];
        let header_ok = gather(mem, readable, &mut header);
        let (status, written) = if !header_ok {
            debug!(vm = %self.vm, disk = %self.name, "request header missing or outside guest memory");
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let data_in = take(writable, total(writable) - 1);
            match kind {
                VIRTIO_BLK_T_IN => {
                    let status = self.transfer(false, sector, &data_in, mem);
                    let written = if status == VIRTIO_BLK_S_OK {
                        total(&data_in)
                    } else {
                        0
                    };
                    (status, written)
                }
                VIRTIO_BLK_T_OUT if self.read_only => {
                    debug!(vm = %self.vm, disk = %self.name, sector, "write to a read-only disk refused");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
                VIRTIO_BLK_T_OUT => {
                    let data_out = skip(readable, HEADER_LEN);
                    (self.transfer(true, sector, &data_out, mem), 0)
                }
                VIRTIO_BLK_T_FLUSH => match self.lun.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(error) => {
                        warn!(vm = %self.vm, disk = %self.name, lun = %self.lun.name(), %error, "flush failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                },
                VIRTIO_BLK_T_DISCARD if self.discard.is_some() => {
                    (self.discard(&skip(readable, HEADER_LEN), mem), 0)
                }
                VIRTIO_BLK_T_GET_ID => {
                    let n = scatter(mem, &data_in, &self.serial);
                    (VIRTIO_BLK_S_OK, n)
                }
                other => {
                    debug!(vm = %self.vm, disk = %self.name, request = other, "unsupported request type");
                    (VIRTIO_BLK_S_UNSUPP, 0)
                }
            }
        };
        if mem
            .write_obj(status as u8, GuestAddress(status_at))
            .is_err()
        {
            return 0;
        }
        (written + 1) as u32
    }

    /// Moves the data of a read (`write == false`) or write at `sector`; returns the status.
    fn transfer(
        &mut self,
        write: bool,
        sector: u64,
        data: &[Segment],
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let len = total(data);
        // The host's share of the disk: waits for this VM's turn (limit, reservation, shares).
        if let Some(clock) = &self.clock {
            clock.admit(len as u64);
        }
        // The guest's mistakes are its to see in the status, and a guest must not be able to
        // flood the host's log: only failures of the LUN itself are warnings.
        let refused = |what: &dyn std::fmt::Display| {
            debug!(vm = %self.vm, disk = %self.name, lun = %self.lun.name(), sector, len,
                   write, error = %what, "disk request refused");
            VIRTIO_BLK_S_IOERR
        };
        let io_error = |what: &dyn std::fmt::Display| {
            warn!(vm = %self.vm, disk = %self.name, lun = %self.lun.name(), sector, len,
                  write, error = %what, "disk request failed");
            VIRTIO_BLK_S_IOERR
        };
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return refused(&"sector number overflows");
        };
        if let Err(error) = check_request(&*self.lun, offset, len as u64) {
            return refused(&error);
        }
        let result = match self.host_ranges(data, mem) {
            Some(ranges) => {
                let mut at = offset;
                let mut batch: Vec<IoRequest> = ranges
                    .into_iter()
                    .map(|(ptr, len)| {
                        let request_offset = at;
                        at += len as u64;
                        // SAFETY: `host_ranges` checked that each range lies inside a guest
                        // memory mapping, which stays mapped while `mem` is borrowed (for all
                        // of this call), and that no two ranges overlap, so these slices do
                        // not alias. The guest may touch the same bytes from its vCPUs
                        // meanwhile, as it may with any device doing DMA: that changes what
                        // it reads or writes, never the host's memory safety.
                        if write {
                            IoRequest::Write {
                                buf: unsafe { std::slice::from_raw_parts(ptr, len) },
                                offset: request_offset,
                            }
                        } else {
                            IoRequest::Read {
                                buf: unsafe { std::slice::from_raw_parts_mut(ptr, len) },
                                offset: request_offset,
                            }
                        }
                    })
                    .collect();
                self.lun.submit(&mut batch)
            }
            None => {
                if len > MAX_BOUNCE {
                    return refused(&format!(
                        "{len} bytes in unaligned or overlapping buffers (at most {MAX_BOUNCE})"
                    ));
                }
                let mut bounce = std::mem::take(&mut self.bounce);
                bounce.resize(len, 0);
                let result = if write {
                    if gather(mem, data, &mut bounce) {
                        self.lun.write_at(&bounce, offset)
                    } else {
                        self.bounce = bounce;
                        return refused(&"buffer outside guest memory");
                    }
                } else {
                    self.lun.read_at(&mut bounce, offset).map(|()| {
                        scatter(mem, data, &bounce);
                    })
                };
                self.bounce = bounce;
                result
            }
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(error) => io_error(&error),
        }
    }

    /// Passes on the ranges of a discard request: the whole LUN sectors each covers, since a
    /// discard is a hint and its ragged edges may be left alone. Returns the status.
    fn discard(&mut self, data: &[Segment], mem: &GuestMemoryMmap) -> u32 {
        let Some(discard) = self.discard.clone() else {
            return VIRTIO_BLK_S_UNSUPP;
        };
        let len = total(data);
        let count = len / DISCARD_RANGE_LEN;
        if len % DISCARD_RANGE_LEN != 0 || count == 0 || count > MAX_DISCARD_SEG as usize {
            debug!(vm = %self.vm, disk = %self.name, len, "malformed discard request");
            return VIRTIO_BLK_S_IOERR;
        }
        let mut ranges = vec![0u8; len];
        if !gather(mem, data, &mut ranges) {
            debug!(vm = %self.vm, disk = %self.name, "discard ranges outside guest memory");
            return VIRTIO_BLK_S_IOERR;
        }
        // One operation of the VM's disk share, whatever it spans: it moves no data.
        if let Some(clock) = &self.clock {
            clock.admit(0);
        }
        let granule = u64::from(self.lun.sector_size());
        for range in ranges.chunks_exact(DISCARD_RANGE_LEN) {
            let le = |at: usize, n: usize| {
                range[at..at + n]
                    .iter()
                    .rev()
                    .fold(0u64, |v, &b| (v << 8) | u64::from(b))
            };
            let (sector, sectors, flags) = (le(0, 8), le(8, 4), le(12, 4));
            // No flag is defined for a discard (UNMAP belongs to write-zeroes).
            if flags != 0 {
                debug!(vm = %self.vm, disk = %self.name, flags, "discard with flags");
                return VIRTIO_BLK_S_UNSUPP;
            }
            if sectors > u64::from(MAX_DISCARD_SECTORS) {
                debug!(vm = %self.vm, disk = %self.name, sectors, "discard range too long");
                return VIRTIO_BLK_S_IOERR;
            }
            let Some(start) = sector.checked_mul(SECTOR) else {
                return VIRTIO_BLK_S_IOERR;
            };
            let end = start.saturating_add(sectors * SECTOR);
            if end > self.lun.size() {
                debug!(vm = %self.vm, disk = %self.name, sector, sectors, "discard past the end");
                return VIRTIO_BLK_S_IOERR;
            }
            let (first, last) = (start.div_ceil(granule) * granule, end / granule * granule);
            if first >= last {
                continue;
            }
            if let Err(error) = discard(first, last - first) {
                warn!(vm = %self.vm, disk = %self.name, lun = %self.lun.name(), sector, sectors,
                      %error, "discard failed");
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }

    /// Where the guest buffers are in our address space, when each is whole LUN sectors,
    /// inside one memory region, and no two overlap: then the LUN can move the data directly.
    fn host_ranges(
        &self,
        data: &[Segment],
        mem: &GuestMemoryMmap,
    ) -> Option<Vec<(*mut u8, usize)>> {
        let sector = self.lun.sector_size() as usize;
        if data.iter().any(|s| s.len % sector != 0) {
            return None;
        }
        let mut ranges = Vec::with_capacity(data.len());
        for segment in data {
            let slice = mem
                .get_slice(GuestAddress(segment.addr), segment.len)
                .ok()?;
            ranges.push((slice.ptr_guard_mut().as_ptr(), segment.len));
        }
        let mut sorted: Vec<(usize, usize)> =
            ranges.iter().map(|&(p, l)| (p as usize, l)).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return None;
        }
        Some(ranges)
    }
}

fn total(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.len).sum()
}

/// The guest address of the last byte of `segments`.
fn last_byte(segments: &[Segment]) -> Option<u64> {
    let last = segments.iter().rev().find(|s| s.len > 0)?;
    Some(last.addr + last.len as u64 - 1)
}

/// The first `n` bytes of `segments`.
fn take(segments: &[Segment], mut n: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if n == 0 {
            break;
        }
        let len = s.len.min(n);
        out.push(Segment { addr: s.addr, len });
        n -= len;
    }
    out
}

/// `segments` without their first `n` bytes.
fn skip(segments: &[Segment], mut n: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if n >= s.len {
            n -= s.len;
            continue;
        }
        out.push(Segment {
            addr: s.addr + n as u64,
            len: s.len - n,
        });
        n = 0;
    }
    out
}

/// Fills `buf` from the start of `segments`; false if they are too short or unreadable.
fn gather(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let n = s.len.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(s.addr))
            .is_err()
        {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Copies `buf` into `segments`; returns how many bytes landed.
fn scatter(mem: &GuestMemoryMmap, segments: &[Segment], buf: &[u8]) -> usize {
    let mut done = 0;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let n = s.len.min(buf.len() - done);
        if mem
            .write_slice(&buf[done..done + n], GuestAddress(s.addr))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard.is_some() {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (mut readable, mut writable) = (Vec::new(), Vec::new());
            let mut misordered = false;
            for d in chain {
                let segment = Segment {
                    addr: d.addr().0,
                    len: d.len() as usize,
                };
                if d.is_write_only() {
                    writable.push(segment);
                } else if writable.is_empty() {
                    readable.push(segment);
                } else {
                    misordered = true;
                }
            }
            let written = if misordered {
                debug!(vm = %self.vm, disk = %self.name, "request with a readable buffer after a writable one");
                0
            } else {
                self.execute(&readable, &writable, mem)
            };
            if let Err(error) = queue.add_used(mem, head, written) {
                warn!(vm = %self.vm, disk = %self.name, %error, "cannot return a used buffer");
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(lens: &[usize]) -> Vec<Segment> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| Segment {
                addr: 0x1000 * (i as u64 + 1),
                len,
            })
            .collect()
    }

    fn lens(segments: &[Segment]) -> Vec<usize> {
        segments.iter().map(|s| s.len).collect()
    }

    #[test]
    fn header_data_and_status_are_carved_out_of_any_buffer_layout() {
        // Header and data in one readable buffer, then data and status in one writable one.
        let readable = segments(&[16 + 512, 1024]);
        let data = skip(&readable, HEADER_LEN);
        assert_eq!(lens(&data), [512, 1024]);
        assert_eq!(data[0].addr, 0x1000 + 16);
        let writable = segments(&[4096, 513]);
        let data_in = take(&writable, total(&writable) - 1);
        assert_eq!(lens(&data_in), [4096, 512]);
        assert_eq!(last_byte(&writable), Some(0x2000 + 512));
        assert_eq!(last_byte(&segments(&[0])), None);
        assert!(take(&writable, 0).is_empty());
        assert!(skip(&readable, 10_000).is_empty());
    }
}
