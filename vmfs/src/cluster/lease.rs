//! Self-fencing: a host writes to the LUN only while its host lease is valid.
//!
//! The lease runs until `fence_after` past the issue time of the last renewal that completed.
//! Every write, flush and compare-and-write of the datastore goes through [`GuardLun`], which
//! checks the lease before the request is issued; once the lease has run out the host is
//! fenced for good (a remount starts a new incarnation). Others declare the host dead only
//! `dead_after` after they last saw it renew, by which time its last write has landed.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lun::{CompareAndWrite, IoRequest, Lun, LunError};

#[derive(Debug)]
pub(crate) struct Lease {
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the lease runs out.
    valid_until: AtomicU64,
    fenced: OnceLock<String>,
    fence_after: Duration,
    lun: String,
    host: String,
}

impl Lease {
    /// A lease that starts now (the slot was just taken).
    pub fn new(lun: &str, host: &str, fence_after: Duration, issued: Instant) -> Lease {
        let epoch = issued;
        Lease {
            epoch,
            valid_until: AtomicU64::new(fence_after.as_nanos() as u64),
            fenced: OnceLock::new(),
            fence_after,
            lun: lun.to_string(),
            host: host.to_string(),
        }
    }

    fn since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// A renewal issued at `issued` completed.
    pub fn renewed(&self, issued: Instant) {
        let until = self.since_epoch(issued) + self.fence_after.as_nanos() as u64;
        self.valid_until.fetch_max(until, Ordering::SeqCst);
    }

    /// Time left before the lease runs out (zero when it has).
    pub fn remaining(&self) -> Duration {
        let now = self.since_epoch(Instant::now());
        Duration::from_nanos(self.valid_until.load(Ordering::SeqCst).saturating_sub(now))
    }

    pub fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// Stops every write from now on; logged once, with host and LUN.
    pub fn fence(&self, reason: String) {
        if self.fenced.set(reason.clone()).is_ok() {
            tracing::error!(host = %self.host, lun = %self.lun, %reason, "host fenced: no more writes to this datastore");
        }
    }

    /// Ok while the host may write.
    pub fn check(&self) -> Result<(), String> {
        if let Some(reason) = self.fenced() {
            return Err(reason.to_string());
        }
        if self.remaining().is_zero() {
            self.fence(format!(
                "no heartbeat renewal completed within the {:?} host lease",
                self.fence_after
            ));
            return Err(self.fenced().unwrap_or_default().to_string());
        }
        Ok(())
    }
}

/// A LUN that refuses every write once the host lease has run out.
pub(crate) struct GuardLun {
    inner: Arc<dyn Lun>,
    lease: Arc<Lease>,
}

impl GuardLun {
    pub fn new(inner: Arc<dyn Lun>, lease: Arc<Lease>) -> GuardLun {
        GuardLun { inner, lease }
    }

    fn allow(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.lease.check().map_err(|reason| LunError::Io {
            lun: self.inner.name().to_string(),
            offset,
            len,
            source: io::Error::other(format!("host fenced: {reason}")),
        })
    }
}

impl fmt::Debug for GuardLun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardLun")
            .field("inner", &self.inner.name())
            .field("fenced", &self.lease.fenced())
            .finish()
    }
}

impl Lun for GuardLun {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.allow(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        self.allow(0, 0)?;
        self.inner.flush()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn supports_compare_and_write(&self) -> bool {
        self.inner.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        self.inner.compare_and_write_scope()
    }
    fn reach(&self) -> lun::Reach {
        self.inner.reach()
    }
    fn identity(&self) -> Option<lun::LunIdentity> {
        self.inner.identity()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<CompareAndWrite> {
        self.allow(offset, new.len() as u64)?;
        self.inner.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.allow(offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> lun::Result<()> {
        if batch.iter().any(|r| matches!(r, IoRequest::Write { .. })) {
            self.allow(0, 0)?;
        }
        self.inner.submit(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_runs_out_and_fencing_sticks() {
        let t0 = Instant::now();
        let lease = Lease::new("l", "h", Duration::from_millis(30), t0);
        assert!(lease.check().is_ok());
        lease.renewed(t0 + Duration::from_millis(10));
        assert!(lease.remaining() > Duration::from_millis(0));
        std::thread::sleep(Duration::from_millis(50));
        let err = lease.check().unwrap_err();
        assert!(err.contains("host lease"), "{err}");
        // A late renewal does not un-fence.
        lease.renewed(Instant::now());
        assert!(lease.check().is_err());
    }
}
