//! KVM hypervisor: boots guests whose disks are any Lun.
