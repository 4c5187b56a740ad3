//! Disaster recovery on top of replication, as VMware Site Recovery Manager does it on
//! array replication: a recovery plan ([`Plan`]) names what is protected and how to bring
//! it up at the DR site; a drill copies the replicas at one consistent point and starts
//! the VMs from the copies, and its [`report::DrillRecord`] says how long that took (RTO)
//! and how old the data was (RPO).
//!
//! This crate holds what does not touch a LUN: the plan, its checks that need nothing but
//! the plan, and the report. The `vapp dr` commands check the plan against the site and
//! run it.

pub mod plan;
pub mod report;

pub use plan::{Plan, PlanError, ReplicaRef, Verify, VmEntry};
pub use report::{DrillRecord, Outcome, StepRecord, VmResult};
