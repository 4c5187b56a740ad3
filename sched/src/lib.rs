//! Host resources for the VMs of one host, as ESX's resource manager sees them: every VM has
//! shares (priority under contention), a reservation (a guaranteed minimum) and a limit (a
//! maximum) for CPU, memory, disk and network.
//!
//! - [`Topology`] reads the host's packages, cores and hyperthreads from sysfs and places the
//!   vCPUs of an SMP VM on distinct physical cores.
//! - [`Cgroup`] is one VM's cgroup (v1 `cpu`/`cpuset`/`memory`, or v2 if that is what the host
//!   mounts): CPU shares and quota, cpuset, memory limit.
//! - [`Ledger`] is admission control: the reservations of the running VMs of a host, kept as
//!   files in the runtime directory so every VM process and the host agent see the same sum.
//! - [`Pool`] is a resource pool: CPU and memory settings for a group of VMs, a nested cgroup.
//! - [`Clock`] is the I/O scheduler of one resource class (disk requests, transmitted
//!   frames): mClock's three tags (reservation, limit, proportional) kept in a shared-memory
//!   file per class, so the separate processes of a host's VMs schedule against one another
//!   without a broker process.

mod admission;
mod cgroup;
mod clock;
mod error;
mod pool;
mod power;
mod resources;
mod topology;

pub use admission::{Admitted, HostCapacity, Ledger, LedgerEntry};
pub use cgroup::{Cgroup, CgroupVersion};
pub use clock::{Class, Clock, NET_CAPACITY_ENV, SlotUse, Ticket, net_capacity};
pub use error::{Result, SchedError};
pub use pool::{Pool, pools_dir};
pub use power::{CGROUP_ROOT, PowerOn, host_memory, ksm_pages, vcpu_threads};
pub use resources::{Amount, Checked, CpuAmount, Level, Rate, Resources, Setting, Shares};
pub use topology::{Cpu, Topology};
