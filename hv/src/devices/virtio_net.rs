//! virtio-net backed by a tap device, with Firecracker-style token-bucket rate limits on
//! each direction, and transmit through the host's network scheduler (`sched::Clock`: the
//! VM-wide limit over all its NICs, and its share of the host's capacity).
//!
//! Transmit runs on the vCPU thread inside the guest's QUEUE_NOTIFY. Receive runs on a
//! backend thread per NIC that polls the tap: the guest's notify of the receive queue (new
//! buffers) and a throttled transmit wake that thread through `kick`. No offloads are
//! offered, so every frame is a plain Ethernet frame behind the 12-byte virtio_net_hdr_v1.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{MmioTransport, VirtioDevice};
use crate::config::NicLimits;
use crate::net::{MacAddr, Tap, TokenBucket};

pub(crate) const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
const HEADER_LEN: usize = 12;
/// The largest frame a tap hands over without offloads, plus room for a VLAN tag.
const MAX_FRAME: usize = 65_550;

/// Both buckets of one direction.
#[derive(Debug, Default)]
struct Limiter {
    bytes: Option<TokenBucket>,
    packets: Option<TokenBucket>,
}

impl Limiter {
    fn new(limits: &NicLimits) -> Limiter {
        Limiter {
            bytes: limits.bytes.map(TokenBucket::new),
            packets: limits.packets.map(TokenBucket::new),
        }
    }

    /// Takes one frame of `len` bytes, or says when to try again.
    fn admit(&mut self, len: usize, now: Instant) -> Result<(), Instant> {
        self.check(len, now)?;
        self.consume(len);
        Ok(())
    }

    /// Whether a frame of `len` bytes may pass now, without taking it.
    fn check(&mut self, len: usize, now: Instant) -> Result<(), Instant> {
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &mut self.bytes
            && let Err(w) = bucket.check(len as u64, now)
        {
            wait = wait.max(w);
        }
        if let Some(bucket) = &mut self.packets
            && let Err(w) = bucket.check(1, now)
        {
            wait = wait.max(w);
        }
        if !wait.is_zero() {
            return Err(now + wait);
        }
        Ok(())
    }

    fn consume(&mut self, len: usize) {
        if let Some(bucket) = &mut self.bytes {
            bucket.consume(len as u64);
        }
        if let Some(bucket) = &mut self.packets {
            bucket.consume(1);
        }
    }
}

/// Why receive last stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStop {
    TapEmpty,
    NoBuffers,
    Throttled(Instant),
}

/// What the backend thread waits for next.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    poll_tap: bool,
    deadline: Option<Instant>,
}

pub(crate) struct Net {
    vm: String,
    name: String,
    tap: Arc<Tap>,
    config: [u8; 6],
    kick: EventFd,
    rx_frame: Vec<u8>,
    /// Length of a frame read from the tap and not yet delivered (0: none).
    rx_pending: usize,
    rx_stop: RxStop,
    rx_limit: Limiter,
    tx_frame: Vec<u8>,
    tx_limit: Limiter,
    tx_clock: Option<Arc<sched::Clock>>,
    tx_throttled_until: Option<Instant>,
}

impl Net {
    pub fn new(
        vm: &str,
        name: &str,
        tap: Arc<Tap>,
        mac: MacAddr,
        rx: &NicLimits,
        tx: &NicLimits,
        kick: EventFd,
    ) -> Net {
        Net {
            vm: vm.to_string(),
            name: name.to_string(),
            tap,
            config: mac.0,
            kick,
            rx_frame: vec![0; HEADER_LEN + MAX_FRAME],
            rx_pending: 0,
            rx_stop: RxStop::TapEmpty,
            rx_limit: Limiter::new(rx),
            tx_frame: vec![0; HEADER_LEN + MAX_FRAME],
            tx_limit: Limiter::new(tx),
            tx_clock: None,
            tx_throttled_until: None,
        }
    }

    /// Sends through the VM's network scheduler slot too.
    pub fn scheduled(mut self, clock: Option<Arc<sched::Clock>>) -> Net {
        self.tx_clock = clock;
        self
    }

    fn wake_backend(&self) {
        if let Err(error) = self.kick.write(1) {
            warn!(vm = %self.vm, nic = %self.name, %error, "cannot wake the network backend");
        }
    }

    /// Moves frames from the tap into the guest's receive buffers while there are both;
    /// returns whether the guest should be interrupted.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let now = Instant::now();
            if self.rx_pending == 0 {
                if let RxStop::Throttled(until) = self.rx_stop
                    && now < until
                {
                    break;
                }
                match self.tap.read_frame(&mut self.rx_frame[HEADER_LEN..]) {
                    Ok(n) => self.rx_pending = n,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_stop = RxStop::TapEmpty;
                        break;
                    }
                    Err(error) => {
                        warn!(vm = %self.vm, nic = %self.name, tap = %self.tap.name(), %error,
                              "cannot read from the tap");
                        self.rx_stop = RxStop::TapEmpty;
                        break;
                    }
                }
            }
            if let Err(until) = self.rx_limit.admit(self.rx_pending, now) {
                self.rx_stop = RxStop::Throttled(until);
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.rx_stop = RxStop::NoBuffers;
                break;
            };
            let head = chain.head_index();
            let len = HEADER_LEN + self.rx_pending;
            let header = &mut self.rx_frame[..HEADER_LEN];
            header.fill(0);
            header[10] = 1; // num_buffers
            let frame = &self.rx_frame[..len];
            let mut done = 0;
            for d in chain.writable() {
                if done == len {
                    break;
                }
                let n = (d.len() as usize).min(len - done);
                if mem
                    .write_slice(&frame[done..done + n], GuestAddress(d.addr().0))
                    .is_err()
                {
                    break;
                }
                done += n;
            }
            self.rx_pending = 0;
            if done < len {
                debug!(vm = %self.vm, nic = %self.name, len, room = done,
                       "receive buffer too small or outside guest memory: frame dropped");
                queue.go_to_previous_position();
                continue;
            }
            if let Err(error) = queue.add_used(mem, head, len as u32) {
                warn!(vm = %self.vm, nic = %self.name, %error, "cannot return a used buffer");
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// Takes a transmitted frame of `len` bytes from this NIC's buckets and the VM's scheduler
    /// slot, or says when to try again; a refused frame is charged to neither.
    fn admit_tx(&mut self, len: usize, now: Instant) -> Result<(), Instant> {
        self.tx_limit.check(len, now)?;
        if let Some(clock) = &self.tx_clock {
            clock.try_admit(len as u64).map_err(|wait| now + wait)?;
        }
        self.tx_limit.consume(len);
        Ok(())
    }

    /// Sends the guest's frames to the tap while the rate limits let them through.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let now = Instant::now();
            if let Some(until) = self.tx_throttled_until {
                if now < until {
                    break;
                }
                self.tx_throttled_until = None;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut len = 0;
            let mut fault = false;
            for d in chain.readable() {
                let n = (d.len() as usize).min(self.tx_frame.len() - len);
                if mem
                    .read_slice(&mut self.tx_frame[len..len + n], GuestAddress(d.addr().0))
                    .is_err()
                {
                    fault = true;
                    break;
                }
                len += n;
            }
            if fault || len <= HEADER_LEN {
                debug!(vm = %self.vm, nic = %self.name, len, "malformed transmit buffer dropped");
            } else if let Err(until) = self.admit_tx(len - HEADER_LEN, now) {
                queue.go_to_previous_position();
                self.tx_throttled_until = Some(until);
                self.wake_backend();
                break;
            } else if let Err(error) = self.tap.write_frame(&self.tx_frame[HEADER_LEN..len]) {
                // A full tap queue drops the frame as a congested switch port would.
                debug!(vm = %self.vm, nic = %self.name, %error, "frame not sent");
            }
            if let Err(error) = queue.add_used(mem, head, 0) {
                warn!(vm = %self.vm, nic = %self.name, %error, "cannot return a used buffer");
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    /// The backend thread's turn: retries a throttled transmit, then receives.
    fn event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> (bool, Plan) {
        let mut interrupt = false;
        if let [rx, tx] = queues {
            if self.tx_throttled_until.is_some() {
                interrupt |= self.transmit(tx, mem);
            }
            interrupt |= self.receive(rx, mem);
        }
        let mut deadline = self.tx_throttled_until;
        if let RxStop::Throttled(until) = self.rx_stop {
            deadline = Some(deadline.map_or(until, |d| d.min(until)));
        }
        let plan = Plan {
            poll_tap: self.rx_stop == RxStop::TapEmpty,
            deadline,
        };
        (interrupt, plan)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = (offset as usize).min(self.config.len());
        let end = (start + data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX => {
                // New receive buffers: a frame may be waiting for them.
                if self.rx_stop == RxStop::NoBuffers {
                    self.rx_stop = RxStop::TapEmpty;
                }
                let interrupt = self.receive(queue, mem);
                self.wake_backend();
                interrupt
            }
            TX => self.transmit(queue, mem),
            _ => false,
        }
    }
}

/// Serves one NIC's receive side and throttle timers until `stop` is written.
pub(crate) fn run_backend(
    transport: Arc<Mutex<MmioTransport<Net>>>,
    tap: Arc<Tap>,
    kick: EventFd,
    stop: EventFd,
) {
    let idle = Plan {
        poll_tap: false,
        deadline: None,
    };
    loop {
        let plan = transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .device_event(|net, queues, mem| net.event(queues, mem))
            .unwrap_or(idle);
        let mut fds = vec![
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if plan.poll_tap {
            fds.push(libc::pollfd {
                fd: tap.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = plan.deadline.map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            // Round up: waking early would only spin.
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!(%error, tap = %tap.name(), "network backend poll failed; the NIC stops");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            // Nonblocking eventfd: only clears the count.
            let _ = kick.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::RateLimit;

    #[test]
    fn a_frame_passes_only_when_both_buckets_allow_it_and_is_paid_once() {
        let mut limiter = Limiter::new(&NicLimits {
            bytes: Some(RateLimit {
                rate: 10_000,
                burst: 3_000,
            }),
            packets: Some(RateLimit { rate: 10, burst: 2 }),
        });
        let now = Instant::now();
        assert!(limiter.admit(1_000, now).is_ok());
        assert!(limiter.admit(1_000, now).is_ok());
        // Bytes remain, packets do not: refused until a packet token is back (100 ms), and
        // the refused frame took no bytes.
        let until = limiter.admit(1_000, now).unwrap_err();
        assert!(
            until >= now + Duration::from_millis(99),
            "{:?}",
            until - now
        );
        let later = now + Duration::from_millis(100);
        assert!(limiter.admit(1_000, later).is_ok());
        // 100 ms on, a packet token is back but the bytes bucket holds 2,000 (3,000 − 3,000
        // taken + 2,000 refilled): 2,500 must wait, 2,000 may go.
        let again = later + Duration::from_millis(100);
        assert!(limiter.admit(2_500, again).is_err());
        assert!(limiter.admit(2_000, again).is_ok());
    }
}
