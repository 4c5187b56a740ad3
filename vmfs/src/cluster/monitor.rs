//! Following other hosts' heartbeats on this host's own monotonic clock.
//!
//! A host is judged only by whether its renewal counter moves while we watch: alive when we
//! saw it move less than the dead-host timeout ago, dead when it has not moved for that long,
//! unknown before either can be said. Timestamps in the records are never compared with our
//! clock.

use std::time::{Duration, Instant};

use super::heartbeat::{Heartbeat, SlotState};

#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub hb: Heartbeat,
    /// When the current (generation, nonce, state, counter) was first seen.
    pub since: Instant,
    /// We saw the counter move within this incarnation.
    pub moved: bool,
}

/// The latest observation of every slot.
#[derive(Debug)]
pub(crate) struct Monitor {
    slots: Vec<Option<Seen>>,
}

/// What the monitor can say about one incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watch {
    /// The slot is free, never used, or holds another incarnation.
    Gone,
    Alive,
    Dead,
    Unknown,
    /// Claimed for recovery by the incarnation (slot, generation).
    Recovering {
        slot: u32,
        generation: u64,
    },
}

impl Monitor {
    pub fn new(slots: u32) -> Monitor {
        Monitor {
            slots: vec![None; slots as usize],
        }
    }

    pub fn observe(&mut self, slot: u32, hb: Result<Option<Heartbeat>, String>, now: Instant) {
        let i = slot as usize;
        if i >= self.slots.len() {
            return;
        }
        // A record that does not verify is a torn read of a slot being written: keep the
        // last good observation.
        let Ok(hb) = hb else { return };
        let Some(hb) = hb else {
            self.slots[i] = None;
            return;
        };
        match &mut self.slots[i] {
            Some(seen)
                if seen.hb.generation == hb.generation
                    && seen.hb.nonce == hb.nonce
                    && seen.hb.state == hb.state
                    && seen.hb.recoverer == hb.recoverer =>
            {
                if seen.hb.counter != hb.counter {
                    seen.since = now;
                    seen.moved = true;
                }
                seen.hb = hb;
            }
            other => {
                *other = Some(Seen {
                    hb,
                    since: now,
                    moved: false,
                })
            }
        }
    }

    pub fn seen(&self, slot: u32) -> Option<&Seen> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// The state of incarnation (slot, generation truncated to 32 bits).
    pub fn watch(&self, slot: u32, generation: u32, dead_after: Duration, now: Instant) -> Watch {
        let Some(seen) = self.seen(slot) else {
            return Watch::Gone;
        };
        if seen.hb.generation as u32 != generation {
            return Watch::Gone;
        }
        match seen.hb.state {
            SlotState::Free => Watch::Gone,
            SlotState::Recovering => match seen.hb.recoverer {
                Some(r) => Watch::Recovering {
                    slot: r.slot,
                    generation: r.generation,
                },
                None => Watch::Unknown,
            },
            SlotState::Live => {
                if now.duration_since(seen.since) >= dead_after {
                    Watch::Dead
                } else if seen.moved {
                    Watch::Alive
                } else {
                    Watch::Unknown
                }
            }
        }
    }

    /// Live slots (other than `except`) whose heartbeat has not moved for `dead_after`.
    pub fn dead_slots(&self, except: u32, dead_after: Duration, now: Instant) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                (i as u32 != except
                    && s.hb.state == SlotState::Live
                    && now.duration_since(s.since) >= dead_after)
                    .then_some(i as u32)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn hb(counter: u64) -> Heartbeat {
        Heartbeat {
            slot: 1,
            state: SlotState::Live,
            host: Uuid::nil(),
            hostname: "h".into(),
            generation: 4,
            counter,
            time_ns: 0,
            pid: 1,
            nonce: 9,
            io_timeout_ms: 100,
            boot_id: [0; 16],
            pid_ns: 0,
            recoverer: None,
        }
    }

    #[test]
    fn alive_only_after_moving_dead_after_silence() {
        let dead = Duration::from_millis(800);
        let t0 = Instant::now();
        let mut m = Monitor::new(4);
        m.observe(1, Ok(Some(hb(1))), t0);
        assert_eq!(m.watch(1, 4, dead, t0), Watch::Unknown);
        m.observe(1, Ok(Some(hb(2))), t0 + Duration::from_millis(100));
        assert_eq!(
            m.watch(1, 4, dead, t0 + Duration::from_millis(200)),
            Watch::Alive
        );
        assert_eq!(m.watch(1, 3, dead, t0), Watch::Gone);
        // No movement for the dead-host timeout after the last change.
        let late = t0 + Duration::from_millis(950);
        assert_eq!(m.watch(1, 4, dead, late), Watch::Dead);
        assert_eq!(m.dead_slots(0, dead, late), vec![1]);
        assert!(m.dead_slots(1, dead, late).is_empty());
        // A torn read keeps the last observation.
        m.observe(1, Err("checksum mismatch".into()), late);
        assert_eq!(m.watch(1, 4, dead, late), Watch::Dead);
    }
}
