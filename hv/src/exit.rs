//! How a VM ends, and the latch its vCPU threads share so that the first vCPU to end the VM
//! (or a `stop` from outside) brings every other vCPU out of KVM_RUN.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::cpu::Registers;

/// Why a VM is no longer running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off: ACPI S5 (status 0) or a write of `status` to the exit-status port.
    PowerOff { status: u32 },
    /// The guest asked for a reset (ACPI reset register or the i8042 reset line). The VM is
    /// stopped; booting it again is the caller's decision.
    Reset,
    /// Stopped from the host with [`crate::VmHandle::stop`].
    Stopped,
    /// The guest or KVM failed: triple fault, emulation failure, failed VM entry, internal
    /// error. `registers` are those of the vCPU that failed, when they could be read.
    Crashed {
        vcpu: u32,
        reason: String,
        registers: Option<Box<Registers>>,
    },
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::PowerOff { status } => write!(f, "powered off (status {status:#x})"),
            VmExit::Reset => f.write_str("reset by the guest"),
            VmExit::Stopped => f.write_str("stopped"),
            VmExit::Crashed {
                vcpu,
                reason,
                registers,
            } => {
                write!(f, "crashed on vCPU {vcpu}: {reason}")?;
                if let Some(registers) = registers {
                    write!(f, " [{registers}]")?;
                }
                Ok(())
            }
        }
    }
}

/// Signals the vCPU threads, to interrupt KVM_RUN.
pub(crate) trait Kick: Send + Sync {
    fn kick(&self);
}

/// The first exit wins; every registered vCPU is kicked when it is set.
#[derive(Default)]
pub(crate) struct ExitLatch {
    set: AtomicBool,
    state: Mutex<LatchState>,
    changed: Condvar,
}

#[derive(Default)]
struct LatchState {
    exit: Option<VmExit>,
    kickers: Vec<Box<dyn Kick>>,
}

impl ExitLatch {
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Registers a vCPU to be kicked; false if the VM has already ended (do not run).
    pub fn register(&self, kicker: Box<dyn Kick>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.exit.is_some() {
            return false;
        }
        state.kickers.push(kicker);
        true
    }

    /// Ends the VM with `exit` unless it has already ended; returns whether this call did.
    pub fn set(&self, exit: VmExit) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.exit.is_some() {
            return false;
        }
        state.exit = Some(exit);
        self.set.store(true, Ordering::SeqCst);
        for kicker in &state.kickers {
            kicker.kick();
        }
        self.changed.notify_all();
        true
    }

    pub fn get(&self) -> Option<VmExit> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exit
            .clone()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<VmExit> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.exit.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        state.exit.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    struct Counter(Arc<AtomicUsize>);

    impl Kick for Counter {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn first_exit_wins_and_kicks_everyone_once() {
        let latch = ExitLatch::default();
        let kicks = Arc::new(AtomicUsize::new(0));
        assert!(latch.register(Box::new(Counter(kicks.clone()))));
        assert!(latch.register(Box::new(Counter(kicks.clone()))));
        assert!(latch.set(VmExit::PowerOff { status: 3 }));
        assert!(!latch.set(VmExit::Stopped));
        assert_eq!(latch.get(), Some(VmExit::PowerOff { status: 3 }));
        assert_eq!(kicks.load(Ordering::SeqCst), 2);
        assert!(!latch.register(Box::new(Counter(kicks))), "too late to run");
        assert_eq!(
            latch.wait(Duration::ZERO),
            Some(VmExit::PowerOff { status: 3 })
        );
    }
}
