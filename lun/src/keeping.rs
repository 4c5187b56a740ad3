//! A LUN handed out together with what must live as long as it: the claim that makes a
//! process its one writer, the snapshot engine it is written through, a lock. The wrapper
//! forwards every request unchanged, so a layer that only needs to keep something alive
//! (or to say what the LUN is called, where it is and what it is) writes no `Lun` of its own.

use std::fmt;
use std::sync::Arc;

use crate::{CasScope, CompareAndWrite, IoRequest, Lun, LunIdentity, Reach, Result};

/// `lun` with `kept` alive beside it, optionally under another name, reach or identity.
pub struct Keeping<K> {
    lun: Arc<dyn Lun>,
    kept: K,
    name: Option<String>,
    reach: Option<Reach>,
    identity: Option<Option<LunIdentity>>,
}

impl<K> Keeping<K> {
    pub fn new(lun: Arc<dyn Lun>, kept: K) -> Keeping<K> {
        Keeping {
            lun,
            kept,
            name: None,
            reach: None,
            identity: None,
        }
    }

    /// Named as the user named it rather than as the LUN underneath calls itself.
    pub fn named(mut self, name: impl Into<String>) -> Keeping<K> {
        self.name = Some(name.into());
        self
    }

    /// Where the LUN really is, when the LUN underneath (a private socket, an engine's view)
    /// cannot tell.
    pub fn reached(mut self, reach: Reach) -> Keeping<K> {
        self.reach = Some(reach);
        self
    }

    /// What the LUN really is, for the same reason.
    pub fn identified(mut self, identity: Option<LunIdentity>) -> Keeping<K> {
        self.identity = Some(identity);
        self
    }

    pub fn kept(&self) -> &K {
        &self.kept
    }
}

impl<K> fmt::Debug for Keeping<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keeping")
            .field("lun", &self.lun)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<K: Send + Sync> Lun for Keeping<K> {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_else(|| self.lun.name())
    }
    fn sector_size(&self) -> u32 {
        self.lun.sector_size()
    }
    fn size(&self) -> u64 {
        self.lun.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.lun.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.lun.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.lun.flush()
    }
    fn is_read_only(&self) -> bool {
        self.lun.is_read_only()
    }
    fn supports_compare_and_write(&self) -> bool {
        self.lun.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> CasScope {
        self.lun.compare_and_write_scope()
    }
    fn reach(&self) -> Reach {
        self.reach.unwrap_or_else(|| self.lun.reach())
    }
    fn identity(&self) -> Option<LunIdentity> {
        match &self.identity {
            Some(identity) => identity.clone(),
            None => self.lun.identity(),
        }
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        self.lun.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.lun.write_zeroes(offset, len)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        self.lun.may_hold_data(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        self.lun.submit(batch)
    }
}
