//! Heartbeat slots: the on-disk record of a host id.
//!
//! Each slot is its own 4 KiB unit with the record in the first sector, so a host's write of
//! its own slot never clobbers another's. A slot is free, live (held by a host that renews
//! it), or recovering (a dead host's slot claimed by the host that replays its journal).
//! `generation` is bumped each time a host takes the slot: locks name (slot, generation), so
//! an incarnation that is gone is told apart from the slot's next holder. `nonce` is random
//! per incarnation and tells apart two processes that raced for the same slot.

use uuid::Uuid;

use crate::codec::*;

const OFF_SLOT: usize = 16;
const OFF_STATE: usize = 20;
const OFF_HOST: usize = 24;
const OFF_GENERATION: usize = 40;
const OFF_COUNTER: usize = 48;
const OFF_TIME: usize = 56;
const OFF_NAME: usize = 64;
const NAME_LEN: usize = 64;
const OFF_PID: usize = 128;
const OFF_BY_SLOT: usize = 132;
const OFF_BY_GENERATION: usize = 136;
const OFF_NONCE: usize = 144;
const OFF_BY_NONCE: usize = 152;
const OFF_IO_TIMEOUT: usize = 160;
const OFF_BOOT_ID: usize = 168;
const OFF_PID_NS: usize = 184;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    Live,
    Recovering,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Free => "free",
            SlotState::Live => "live",
            SlotState::Recovering => "recovering",
        }
    }
}

/// One incarnation of a host id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Incarnation {
    pub slot: u32,
    pub generation: u64,
    pub nonce: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub slot: u32,
    pub state: SlotState,
    pub host: Uuid,
    pub hostname: String,
    pub generation: u64,
    /// Bumped by every renewal; others watch it move.
    pub counter: u64,
    /// The writer's wall clock: informational only, never compared across hosts.
    pub time_ns: i64,
    pub pid: u32,
    pub nonce: u64,
    pub io_timeout_ms: u32,
    /// The boot of the machine the writer runs on (/proc/sys/kernel/random/boot_id).
    pub boot_id: [u8; 16],
    /// The writer's pid namespace (inode of /proc/self/ns/pid; 0 = not recorded): a pid is
    /// checked only from the same namespace, where it means the same process.
    pub pid_ns: u64,
    /// Recovering: the incarnation replaying this slot's journal.
    pub recoverer: Option<Incarnation>,
}

impl Heartbeat {
    pub fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u32(&mut u[..], OFF_SLOT, self.slot);
        let state = match self.state {
            SlotState::Free => 0,
            SlotState::Live => 1,
            SlotState::Recovering => 2,
        };
        put_u32(&mut u[..], OFF_STATE, state);
        u[OFF_HOST..OFF_HOST + 16].copy_from_slice(self.host.as_bytes());
        put_u64(&mut u[..], OFF_GENERATION, self.generation);
        put_u64(&mut u[..], OFF_COUNTER, self.counter);
        put_i64(&mut u[..], OFF_TIME, self.time_ns);
        put_str(&mut u[..], OFF_NAME, NAME_LEN, &self.hostname);
        put_u32(&mut u[..], OFF_PID, self.pid);
        put_u64(&mut u[..], OFF_NONCE, self.nonce);
        put_u32(&mut u[..], OFF_IO_TIMEOUT, self.io_timeout_ms);
        u[OFF_BOOT_ID..OFF_BOOT_ID + 16].copy_from_slice(&self.boot_id);
        put_u64(&mut u[..], OFF_PID_NS, self.pid_ns);
        let by = self.recoverer.unwrap_or(Incarnation {
            slot: u32::MAX,
            generation: 0,
            nonce: 0,
        });
        put_u32(&mut u[..], OFF_BY_SLOT, by.slot);
        put_u64(&mut u[..], OFF_BY_GENERATION, by.generation);
        put_u64(&mut u[..], OFF_BY_NONCE, by.nonce);
        seal(&mut u[..], MAGIC_HEARTBEAT, location, RECORD);
        u
    }

    /// `Ok(None)` for a never-used slot. `u` needs only the record's first 512 bytes.
    pub fn decode(u: &[u8], location: u64, slot: u32) -> Result<Option<Heartbeat>, String> {
        match verify(u, MAGIC_HEARTBEAT, location, RECORD) {
            Err(UnitFault::Blank) => return Ok(None),
            Err(fault) => return Err(fault.to_string()),
            Ok(()) => {}
        }
        let mut host = [0u8; 16];
        host.copy_from_slice(&u[OFF_HOST..OFF_HOST + 16]);
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&u[OFF_BOOT_ID..OFF_BOOT_ID + 16]);
        let state = match get_u32(u, OFF_STATE) {
            0 => SlotState::Free,
            1 => SlotState::Live,
            2 => SlotState::Recovering,
            other => return Err(format!("unknown slot state {other}")),
        };
        let recoverer = (state == SlotState::Recovering).then(|| Incarnation {
            slot: get_u32(u, OFF_BY_SLOT),
            generation: get_u64(u, OFF_BY_GENERATION),
            nonce: get_u64(u, OFF_BY_NONCE),
        });
        let hb = Heartbeat {
            slot: get_u32(u, OFF_SLOT),
            state,
            host: Uuid::from_bytes(host),
            hostname: get_str(u, OFF_NAME, NAME_LEN),
            generation: get_u64(u, OFF_GENERATION),
            counter: get_u64(u, OFF_COUNTER),
            time_ns: get_i64(u, OFF_TIME),
            pid: get_u32(u, OFF_PID),
            nonce: get_u64(u, OFF_NONCE),
            io_timeout_ms: get_u32(u, OFF_IO_TIMEOUT),
            boot_id,
            pid_ns: get_u64(u, OFF_PID_NS),
            recoverer,
        };
        if hb.slot != slot {
            return Err(format!("record claims slot {}", hb.slot));
        }
        Ok(Some(hb))
    }
}

/// This machine's boot id, so a host can tell its own crashed processes from live ones.
pub fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| Uuid::try_parse(s.trim()).ok())
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}

/// This process's pid namespace (0 when unknown).
pub fn pid_ns() -> u64 {
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0)
}

/// True when the record was written by a process of this machine (this boot) in our pid
/// namespace, so its pid names the same process here.
pub fn same_machine(hb: &Heartbeat) -> bool {
    let here = boot_id();
    let ns = pid_ns();
    here != [0; 16] && hb.boot_id == here && ns != 0 && hb.pid_ns == ns
}

/// True when process `pid` exists on this machine.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: SlotState) -> Heartbeat {
        Heartbeat {
            slot: 5,
            state,
            host: Uuid::new_v4(),
            hostname: "esx-01".into(),
            generation: 3,
            counter: 99,
            time_ns: 1_700_000_000_000_000_000,
            pid: 4242,
            nonce: 0xfeed,
            io_timeout_ms: 2000,
            boot_id: [7; 16],
            pid_ns: 4026531836,
            recoverer: (state == SlotState::Recovering).then_some(Incarnation {
                slot: 9,
                generation: 4,
                nonce: 11,
            }),
        }
    }

    #[test]
    fn heartbeat_round_trip() {
        for state in [SlotState::Free, SlotState::Live, SlotState::Recovering] {
            let hb = sample(state);
            let at = 65536 + 5 * 4096;
            let u = hb.encode(at);
            assert_eq!(Heartbeat::decode(&u[..RECORD], at, 5).unwrap(), Some(hb));
            assert!(Heartbeat::decode(&u[..], at, 6).is_err());
        }
        assert_eq!(Heartbeat::decode(&zero_unit()[..], 0, 0).unwrap(), None);
    }

    #[test]
    fn own_process_is_alive_and_pid_zero_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }
}
