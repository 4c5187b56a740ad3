//! The one timing knob of a clustered datastore, and everything derived from it.
//!
//! Like sanlock, every interval is a multiple of one `io_timeout`: the longest a single LUN
//! request may take. It is fixed at format time and stored in the superblock, because hosts
//! that disagreed on it would disagree on when a silent host may be declared dead. Rules
//! (T = io_timeout, production default 2 s):
//!
//! - a host renews its heartbeat every T;
//! - a host whose last successful renewal was issued more than 6T ago fences itself: it stops
//!   every write to the LUN;
//! - other hosts declare it dead when its renewal counter has not moved for 8T, measured on
//!   their own monotonic clock (clocks are never compared across hosts). The 2T between the
//!   two covers a write the host issued just before fencing (at most T in flight) with margin;
//! - taking a free slot without compare-and-write writes, waits 2T and reads back (a racing
//!   host that read the slot as free has written by then);
//! - transient metadata locks are released at the next commit point, every T/2;
//! - the liveness monitor reads the heartbeat region every T/4.

use std::time::Duration;

use serde::Serialize;

/// Derived cluster intervals. See the module docs for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timing {
    pub io_timeout: Duration,
}

impl Timing {
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(2);
    pub const MIN_IO_TIMEOUT: Duration = Duration::from_millis(10);
    pub const MAX_IO_TIMEOUT: Duration = Duration::from_secs(600);

    pub fn new(io_timeout: Duration) -> Timing {
        Timing { io_timeout }
    }

    pub fn from_millis(ms: u32) -> Timing {
        Timing::new(Duration::from_millis(u64::from(ms)))
    }

    pub fn io_timeout_ms(&self) -> u32 {
        self.io_timeout.as_millis().min(u128::from(u32::MAX)) as u32
    }

    /// How often a host writes its heartbeat.
    pub fn renew_interval(&self) -> Duration {
        self.io_timeout
    }

    /// A host that has not completed a renewal issued within this long fences itself.
    pub fn fence_after(&self) -> Duration {
        self.io_timeout * 6
    }

    /// Others declare a host dead when its heartbeat has not moved for this long.
    pub fn dead_after(&self) -> Duration {
        self.io_timeout * 8
    }

    /// Write-wait-reread delay when taking a slot without compare-and-write.
    pub fn delta_wait(&self) -> Duration {
        self.io_timeout * 2
    }

    /// Background commit period; transient locks are held at most about this long.
    pub fn commit_interval(&self) -> Duration {
        self.io_timeout / 2
    }

    /// How often the heartbeat region is read to follow other hosts.
    pub fn monitor_interval(&self) -> Duration {
        self.io_timeout / 4
    }

    /// Longest an operation waits for a lock held by another host before failing with EBUSY:
    /// long enough to outlast a holder that dies and is recovered.
    pub fn lock_wait(&self) -> Duration {
        self.dead_after() + self.io_timeout * 4
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing::new(Timing::DEFAULT_IO_TIMEOUT)
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "io_timeout {:?}, renew every {:?}, self-fence after {:?}, dead after {:?}, commit every {:?}",
            self.io_timeout,
            self.renew_interval(),
            self.fence_after(),
            self.dead_after(),
            self.commit_interval()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_default_is_vmfs_like() {
        let t = Timing::default();
        assert_eq!(t.dead_after(), Duration::from_secs(16));
        // A fenced host's last in-flight write lands before anyone may call it dead.
        assert!(t.fence_after() + t.io_timeout < t.dead_after());
        assert!(t.commit_interval() < t.renew_interval());
    }
}
