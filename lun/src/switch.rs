//! A LUN whose layer below can be replaced while it is in use.
//!
//! A service stacks on a LUN that is already serving I/O: the first snapshot of a running
//! VM's disk puts the copy-on-first-write engine under its virtio-blk device, replication
//! starts under an export its hosts keep using. The consumer holds a [`SwitchLun`] from the
//! start; [`SwitchLun::switch`] waits for the requests in flight, runs the caller's step
//! with no request running (the pause a guest sees), and sends later requests to the new
//! layer. The layers must present the same volume: same size and sector size.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use crate::{CasScope, CompareAndWrite, IoRequest, Lun, LunIdentity, Reach, Result};

/// See the module documentation.
#[derive(Debug)]
pub struct SwitchLun {
    name: String,
    sector_size: u32,
    size: u64,
    below: RwLock<Arc<dyn Lun>>,
}

impl SwitchLun {
    pub fn new(below: Arc<dyn Lun>) -> SwitchLun {
        SwitchLun {
            name: below.name().to_string(),
            sector_size: below.sector_size(),
            size: below.size(),
            below: RwLock::new(below),
        }
    }

    /// The layer requests go to now.
    pub fn below(&self) -> Arc<dyn Lun> {
        Arc::clone(&self.current())
    }

    /// Waits until no request is in flight, then calls `step` with the current layer while
    /// new requests wait. `step` returns the layer to use from then on (or an error, and
    /// the current layer stays). A replacement of another size or sector size is refused.
    pub fn switch<E>(
        &self,
        step: impl FnOnce(&Arc<dyn Lun>) -> std::result::Result<Arc<dyn Lun>, E>,
    ) -> std::result::Result<(), SwitchError<E>> {
        let mut below = self.below.write().unwrap_or_else(PoisonError::into_inner);
        let next = step(&below).map_err(SwitchError::Step)?;
        if next.size() != self.size || next.sector_size() != self.sector_size {
            return Err(SwitchError::Shape {
                lun: self.name.clone(),
                layer: next.name().to_string(),
                size: next.size(),
                sector_size: next.sector_size(),
            });
        }
        *below = next;
        Ok(())
    }

    fn current(&self) -> RwLockReadGuard<'_, Arc<dyn Lun>> {
        self.below.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`SwitchLun::switch`] kept the current layer.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError<E> {
    #[error(transparent)]
    Step(E),
    #[error(
        "{lun}: the new layer {layer} has {size} bytes in {sector_size}-byte sectors, another volume"
    )]
    Shape {
        lun: String,
        layer: String,
        size: u64,
        sector_size: u32,
    },
}

impl Lun for SwitchLun {
    fn name(&self) -> &str {
        &self.name
    }
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.current().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.current().write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.current().flush()
    }
    fn is_read_only(&self) -> bool {
        self.current().is_read_only()
    }
    fn supports_compare_and_write(&self) -> bool {
        self.current().supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> CasScope {
        self.current().compare_and_write_scope()
    }
    fn reach(&self) -> Reach {
        self.current().reach()
    }
    fn identity(&self) -> Option<LunIdentity> {
        self.current().identity()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<CompareAndWrite> {
        self.current().compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.current().write_zeroes(offset, len)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> Result<bool> {
        self.current().may_hold_data(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        self.current().submit(batch)
    }
}
