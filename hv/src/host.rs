//! What the host offers: the KVM API, which backend serves /dev/kvm, vCPU limits, CPUs, memory.
//!
//! The backend matters because it decides what guests can do. VMX and SVM run guest kernels
//! natively. PVM (kvm_pvm, the pagetable-based backend used where hardware virtualization is not
//! exposed, e.g. inside a cloud VM) runs guest user mode natively but emulates guest kernel-mode
//! code instruction by instruction, and its emulator lacks some instructions (cmpxchg16b,
//! fxsave, xrstor): small kernels that avoid them boot, a distribution kernel stops early in its
//! boot (the Debian 6.1 cloud kernel at the slab allocator's cmpxchg16b, about 60 log lines in).

use std::fmt;
use std::path::Path;

use kvm_ioctls::Kvm;

/// The KVM implementation behind /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Intel VT-x (kvm_intel).
    Vmx,
    /// AMD-V (kvm_amd).
    Svm,
    /// Pagetable-based virtual machine (kvm_pvm): guest kernel mode is emulated.
    Pvm,
    /// None of the above could be identified.
    Unknown,
}

impl Backend {
    /// Whether guest kernel-mode code runs in an instruction emulator rather than natively.
    pub fn emulates_guest_kernel(self) -> bool {
        self == Backend::Pvm
    }

    /// A one-line account of what this backend means for guests.
    pub fn guest_limits(self) -> &'static str {
        match self {
            Backend::Vmx | Backend::Svm => "hardware virtualization: guest kernels run natively",
            Backend::Pvm => {
                "guest kernel mode is emulated (about 1.5 M instructions/s) and the emulator \
                 lacks cmpxchg16b, fxsave and xrstor, so a distribution kernel stops early in \
                 its boot; guest user mode runs natively"
            }
            Backend::Unknown => "unknown KVM backend",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Backend::Vmx => "kvm_intel",
            Backend::Svm => "kvm_amd",
            Backend::Pvm => "kvm_pvm",
            Backend::Unknown => "",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::Pvm => "pvm",
            Backend::Unknown => "unknown",
        })
    }
}

/// The host as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub kvm_path: String,
    pub kvm_api_version: i32,
    pub backend: Backend,
    /// The kernel module that serves /dev/kvm, when identified.
    pub backend_module: Option<String>,
    /// KVM_CAP_NR_VCPUS: vCPUs per VM KVM recommends.
    pub recommended_vcpus: u32,
    /// KVM_CAP_MAX_VCPUS: vCPUs per VM KVM allows.
    pub max_vcpus: u32,
    /// vCPUs per VM this hypervisor allows (the MADT numbers APIC ids with one byte).
    pub hv_max_vcpus: u32,
    pub host_cpus: u32,
    pub host_memory_bytes: u64,
    pub host_memory_available_bytes: u64,
}

/// The highest APIC id an xAPIC MADT entry can carry; 0xff is the broadcast id.
pub(crate) const MAX_APIC_VCPUS: u32 = 254;

impl HostInfo {
    pub(crate) fn probe(kvm: &Kvm, kvm_path: &str) -> HostInfo {
        let (backend, module) = detect_backend(Path::new("/sys/module"), &cpu_flags());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let max_vcpus = kvm.get_max_vcpus() as u32;
        HostInfo {
            kvm_path: kvm_path.to_string(),
            kvm_api_version: kvm.get_api_version(),
            backend,
            backend_module: module,
            recommended_vcpus: kvm.get_nr_vcpus() as u32,
            max_vcpus,
            hv_max_vcpus: max_vcpus.min(MAX_APIC_VCPUS),
            host_cpus: online_cpus(),
            host_memory_bytes: meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0),
            host_memory_available_bytes: meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(0),
        }
    }
}

/// Memory the host can give a new guest now (MemAvailable), if /proc/meminfo says.
pub(crate) fn available_memory() -> Option<u64> {
    read_meminfo("MemAvailable")
}

/// The host's RAM (MemTotal), if /proc/meminfo says: no guest can ever have more.
pub fn total_memory() -> Option<u64> {
    read_meminfo("MemTotal")
}

fn read_meminfo(key: &str) -> Option<u64> {
    meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

fn online_cpus() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Which vendor module serves /dev/kvm. Only one can register with KVM; PVM wins when it is
/// loaded on a CPU that exposes no VMX/SVM (the only place it can be the one serving).
fn detect_backend(sys_module: &Path, cpu_flags: &[String]) -> (Backend, Option<String>) {
    let loaded = |backend: Backend| sys_module.join(backend.module()).is_dir();
    let has_flag = |flag: &str| cpu_flags.iter().any(|f| f == flag);
    let backend = if loaded(Backend::Pvm) && !(has_flag("vmx") || has_flag("svm")) {
        Backend::Pvm
    } else if loaded(Backend::Vmx) && has_flag("vmx") {
        Backend::Vmx
    } else if loaded(Backend::Svm) && has_flag("svm") {
        Backend::Svm
    } else if loaded(Backend::Pvm) {
        Backend::Pvm
    } else {
        Backend::Unknown
    };
    let module = (backend != Backend::Unknown).then(|| backend.module().to_string());
    (backend, module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys_module_with(modules: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for m in modules {
            std::fs::create_dir(dir.path().join(m)).unwrap();
        }
        dir
    }

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn backend_follows_the_loaded_module_and_cpu_flags() {
        let pvm = sys_module_with(&["kvm", "kvm_pvm"]);
        assert_eq!(
            detect_backend(pvm.path(), &flags(&["sse2"])).0,
            Backend::Pvm
        );
        let intel = sys_module_with(&["kvm", "kvm_intel"]);
        assert_eq!(
            detect_backend(intel.path(), &flags(&["vmx"])).0,
            Backend::Vmx
        );
        let amd = sys_module_with(&["kvm", "kvm_amd", "kvm_pvm"]);
        assert_eq!(detect_backend(amd.path(), &flags(&["svm"])).0, Backend::Svm);
        let none = sys_module_with(&["kvm"]);
        assert_eq!(
            detect_backend(none.path(), &flags(&[])),
            (Backend::Unknown, None)
        );
    }

    #[test]
    fn meminfo_values_are_bytes() {
        let meminfo = "MemTotal:       24576000 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(meminfo_bytes(meminfo, "MemTotal"), Some(24_576_000 * 1024));
        assert_eq!(meminfo_bytes(meminfo, "MemAvailable"), Some(1024 * 1024));
        assert_eq!(meminfo_bytes(meminfo, "MemFree"), None);
    }
}
