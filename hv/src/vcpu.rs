//! One thread per vCPU: KVM_RUN, serve the exit (port I/O, MMIO, power events), repeat until
//! the VM ends. Anything the guest or KVM cannot continue from ends the VM as `Crashed` with the
//! register state, never a hang.
//!
//! Stopping interrupts KVM_RUN with a real-time signal whose handler sets the vCPU's
//! `immediate_exit`, so a signal that lands just before KVM_RUN is not lost.

use std::cell::Cell;
use std::ptr;
use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use tracing::{error, trace};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::cpu::Registers;
use crate::devices::{Bus, Request};
use crate::exit::{ExitLatch, Kick, VmExit};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set while its VcpuFd lives;
            // a single aligned byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process; every later call reports the first outcome.
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = *INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    outcome.map_err(std::io::Error::from_raw_os_error)
}

struct ThreadKick(libc::pthread_t);

impl Kick for ThreadKick {
    fn kick(&self) {
        // SAFETY: the thread is a vCPU thread of a live VM: it is joined only after the exit
        // latch is set, which is when the kicks are sent.
        unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}

/// What to do after an exit, once the borrow of the vCPU's run structure has ended.
enum Next {
    Continue,
    End(VmExit),
    Crash(String),
    InternalError,
}

pub(crate) struct Vcpu {
    pub id: u32,
    pub fd: VcpuFd,
    pub vm: String,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitLatch>,
}

impl Vcpu {
    /// Runs until the VM ends.
    pub fn run(mut self) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if self.exit.register(Box::new(ThreadKick(me))) {
            while !self.exit.is_set() {
                match self.step() {
                    Next::Continue => {}
                    Next::End(exit) => {
                        self.exit.set(exit);
                    }
                    Next::Crash(reason) => self.crash(reason),
                    Next::InternalError => {
                        let reason = self.internal_error();
                        self.crash(reason);
                    }
                }
            }
        }
        KVM_RUN.with(|run| run.set(ptr::null_mut()));
    }

    fn step(&mut self) -> Next {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                return Next::Continue;
            }
            // An AP woken from wait-for-SIPI.
            Err(e) if e.errno() == libc::EAGAIN => return Next::Continue,
            Err(e) => return Next::Crash(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    trace!(vm = %self.vm, vcpu = self.id, port, "read from an unclaimed port");
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => match self.pio.write(u64::from(port), data) {
                Ok(request) => request.map_or(Next::Continue, end),
                Err(()) => {
                    trace!(vm = %self.vm, vcpu = self.id, port, "write to an unclaimed port");
                    Next::Continue
                }
            },
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    trace!(vm = %self.vm, vcpu = self.id, addr, "read from unclaimed MMIO");
                }
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => match self.mmio.write(addr, data) {
                Ok(request) => request.map_or(Next::Continue, end),
                Err(()) => {
                    trace!(vm = %self.vm, vcpu = self.id, addr, "write to unclaimed MMIO");
                    Next::Continue
                }
            },
            VcpuExit::Intr | VcpuExit::Debug(_) => Next::Continue,
            VcpuExit::Shutdown => Next::Crash("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            VcpuExit::FailEntry(reason, cpu) => Next::Crash(format!(
                "VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
            )),
            VcpuExit::InternalError => Next::InternalError,
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Next::End(VmExit::PowerOff { status: 0 })
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::End(VmExit::Reset),
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                    Next::Crash("the guest reported a crash".to_string())
                }
                other => Next::Crash(format!("unhandled system event {other}")),
            },
            VcpuExit::Exception => Next::Crash("unhandled guest exception".to_string()),
            other => Next::Crash(format!("unhandled exit {other:?}")),
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "internal error",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "KVM internal error {}: {what} (data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }

    fn crash(&self, reason: String) {
        let registers = Registers::capture(&self.fd);
        let shown = registers
            .as_ref()
            .map_or_else(|| "unreadable".to_string(), ToString::to_string);
        error!(vm = %self.vm, vcpu = self.id, %reason, registers = %shown, "vCPU stopped the VM");
        self.exit.set(VmExit::Crashed {
            vcpu: self.id,
            reason,
            registers: registers.map(Box::new),
        });
    }
}

fn end(request: Request) -> Next {
    Next::End(match request {
        Request::PowerOff { status } => VmExit::PowerOff { status },
        Request::Reset => VmExit::Reset,
    })
}
