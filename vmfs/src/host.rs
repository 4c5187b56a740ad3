//! Heartbeat slots: a host's identity on the datastore.
//!
//! Each slot is its own 4 KiB unit with the record in the first sector, so a host's write of
//! its own slot can never clobber another host's. In this version a read-write open takes a
//! slot with plain reads and writes and frees it at close; the cluster layer turns the
//! counter/timestamp into a renewed delta lease.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    Live,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub slot: u32,
    pub state: SlotState,
    pub host: Uuid,
    pub hostname: String,
    /// Bumped each time a host takes the slot: tells incarnations apart for lock records.
    pub generation: u64,
    pub counter: u64,
    pub time_ns: i64,
    pub pid: u32,
}

impl Heartbeat {
    pub fn encode(&self, location: u64) -> Box<Unit> {
        let mut u = zero_unit();
        put_u32(&mut u[..], OFF_SLOT, self.slot);
        put_u32(
            &mut u[..],
            OFF_STATE,
            match self.state {
                SlotState::Free => 0,
                SlotState::Live => 1,
            },
        );
        u[OFF_HOST..OFF_HOST + 16].copy_from_slice(self.host.as_bytes());
        put_u64(&mut u[..], OFF_GENERATION, self.generation);
        put_u64(&mut u[..], OFF_COUNTER, self.counter);
        put_i64(&mut u[..], OFF_TIME, self.time_ns);
        put_str(&mut u[..], OFF_NAME, NAME_LEN, &self.hostname);
        put_u32(&mut u[..], OFF_PID, self.pid);
        seal(&mut u[..], MAGIC_HEARTBEAT, location, RECORD);
        u
    }

    /// `Ok(None)` for a never-used slot.
    pub fn decode(u: &[u8], location: u64, slot: u32) -> Result<Option<Heartbeat>, String> {
        match verify(u, MAGIC_HEARTBEAT, location, RECORD) {
            Err(UnitFault::Blank) => return Ok(None),
            Err(fault) => return Err(fault.to_string()),
            Ok(()) => {}
        }
        let mut host = [0u8; 16];
        host.copy_from_slice(&u[OFF_HOST..OFF_HOST + 16]);
        let hb = Heartbeat {
            slot: get_u32(u, OFF_SLOT),
            state: if get_u32(u, OFF_STATE) == 1 {
                SlotState::Live
            } else {
                SlotState::Free
            },
            host: Uuid::from_bytes(host),
            hostname: get_str(u, OFF_NAME, NAME_LEN),
            generation: get_u64(u, OFF_GENERATION),
            counter: get_u64(u, OFF_COUNTER),
            time_ns: get_i64(u, OFF_TIME),
            pid: get_u32(u, OFF_PID),
        };
        if hb.slot != slot {
            return Err(format!("record claims slot {}", hb.slot));
        }
        Ok(Some(hb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_round_trip() {
        let hb = Heartbeat {
            slot: 5,
            state: SlotState::Live,
            host: Uuid::new_v4(),
            hostname: "esx-01".into(),
            generation: 3,
            counter: 99,
            time_ns: 1_700_000_000_000_000_000,
            pid: 4242,
        };
        let u = hb.encode(65536 + 5 * 4096);
        assert_eq!(
            Heartbeat::decode(&u[..], 65536 + 5 * 4096, 5).unwrap(),
            Some(hb)
        );
        assert!(Heartbeat::decode(&u[..], 65536 + 5 * 4096, 6).is_err());
        assert_eq!(Heartbeat::decode(&zero_unit()[..], 0, 0).unwrap(), None);
    }
}
