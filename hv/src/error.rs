//! Errors of the hypervisor. Every variant names the VM (and where it matters the LUN, the
//! device or the KVM call) so a failure can be diagnosed from the message and its sources
//! (the OS or KVM error is the `source()`, not repeated in the message, so a chain printer
//! such as anyhow's `{:#}` shows it once).

use std::io;

pub type Result<T> = std::result::Result<T, HvError>;

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open {path} (is KVM loaded and may this user use it?)")]
    KvmUnavailable {
        path: String,
        #[source]
        source: io::Error,
    },

    #[error("KVM API version {found} at {path} is not the stable version {expected}")]
    KvmApiVersion {
        path: String,
        found: i32,
        expected: i32,
    },

    #[error("vm {vm}: invalid configuration: {reason}")]
    InvalidConfig { vm: String, reason: String },

    #[error("vm {vm}: {requested} vCPUs requested, this host allows at most {max}")]
    TooManyVcpus {
        vm: String,
        requested: u32,
        max: u32,
    },

    #[error(
        "vm {vm}: {requested} bytes of guest memory requested, the host can give {available} \
         (MemAvailable)"
    )]
    MemoryTooLarge {
        vm: String,
        requested: u64,
        available: u64,
    },

    #[error("vm {vm}: no kernel given")]
    MissingKernel { vm: String },

    #[error("vm {vm}: the kernel is neither a bzImage nor an x86-64 ELF: {reason}")]
    BadKernel { vm: String, reason: String },

    #[error("vm {vm}: cannot load the kernel")]
    KernelLoad {
        vm: String,
        #[source]
        source: linux_loader::loader::Error,
    },

    #[error("vm {vm}: kernel command line: {reason}")]
    Cmdline { vm: String, reason: String },

    #[error("vm {vm}: the initrd ({size} bytes) does not fit in guest memory: {reason}")]
    InitrdTooLarge {
        vm: String,
        size: u64,
        reason: String,
    },

    #[error("vm {vm}: disk {index} ({lun}): {reason}")]
    BadDisk {
        vm: String,
        index: usize,
        lun: String,
        reason: String,
    },

    #[error("vm {vm}: nic {index} ({tap}): {reason}")]
    BadNic {
        vm: String,
        index: usize,
        tap: String,
        reason: String,
    },

    #[error("vm {vm}: guest memory: {reason}")]
    GuestMemory { vm: String, reason: String },

    #[error("vm {vm}: KVM {op} failed")]
    Kvm {
        vm: String,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },

    #[error("vm {vm}: {what}")]
    Io {
        vm: String,
        what: String,
        #[source]
        source: io::Error,
    },
}
