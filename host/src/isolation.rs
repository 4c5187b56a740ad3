//! The isolation response: what the agent does with its VMs when its host loses the
//! datastore (VMware HA's "host isolation response").
//!
//! Each datastore of the agent counts alone: a host isolated from one of them powers off
//! the VMs of that datastore only, and rejoins it (a new Datastore and a new host record,
//! `/.vapp/hosts/<name>`) while the others go on as they were.
//!
//! A host is isolated when vmfs fenced its slot (no heartbeat renewal completed within the
//! fence time) or when the agent has not read the datastore's heartbeats for that long. Every
//! VM runner is a host of its own on the same link, so it is fenced too and its guest can no
//! longer write; the other hosts declare the runners dead and restart their protected VMs.
//! With `power-off` (the default) the agent powers its VMs off at once, so that nothing of
//! them keeps running beside the copies restarted elsewhere; with `keep` it leaves them up
//! (still unable to write). Once the datastore answers again the agent rejoins it as a new
//! incarnation of a host slot (a fenced incarnation stays fenced) and goes on; it starts no VM by itself on rejoining:
//! a VM another host took is that host's, as its lock says. A kept VM whose runner was fenced
//! can never write again and has lost its lock: the agent then powers it off (what VMware HA
//! does to the isolated copy of a VM restarted elsewhere).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmfs::Datastore;

use crate::{Agent, drop_event_raw, lock, open_record};

/// `isolation_response` in host.toml and `isolation` in a VM's `[ha]` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationResponse {
    /// Power the VM off so that it can restart on a host that still reaches the datastore.
    #[default]
    PowerOff,
    /// Leave the VM running; it cannot write until its host rejoins, and it does not then.
    Keep,
}

/// How long a VM's runner may take to power its guest off when isolated.
const POWER_OFF_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(crate) struct Isolation {
    /// When the agent last read the heartbeats; `None` until the first read.
    last_read: Option<Instant>,
    /// Why the host is isolated, while it is.
    isolated: Option<String>,
    /// VMs left running by the `keep` response during this isolation.
    kept: Vec<String>,
}

impl Agent {
    /// True while this host has lost datastore `store`.
    pub(crate) fn is_isolated(&self, store: usize) -> bool {
        lock(&self.stores[store].isolation).isolated.is_some()
    }

    /// Records whether this tick of the agent read the heartbeats of datastore `store`.
    pub(crate) fn heartbeats_read(&self, store: usize, ok: bool) {
        let mut state = lock(&self.stores[store].isolation);
        if ok || state.last_read.is_none() {
            state.last_read = Some(Instant::now());
        }
    }

    /// Runs the isolation response when the host has just lost datastore `store`, and
    /// rejoins it when it answers again. True while the host is isolated from it: the agent
    /// then must not act on what it reads of the other hosts there. The other datastores
    /// and their VMs are not touched.
    pub(crate) fn check_isolation(&self, store: usize) -> bool {
        let st = &self.stores[store];
        if self.is_isolated(store) {
            return !self.rejoin(store);
        }
        if lock(&st.record).is_none() {
            self.reopen_record(store);
        }
        // Before the agent reads the locks again: a kept runner it finds fenced is powered
        // off as such, not taken for one that merely lost its lock.
        let kept = std::mem::take(&mut lock(&st.isolation).kept);
        self.power_off_fenced(store, kept);
        let ds = st.ds();
        let fence_after = ds.timing().fence_after();
        let reason = ds.fenced().or_else(|| {
            lock(&st.isolation)
                .last_read
                .map(|t| t.elapsed())
                .filter(|&unread| unread >= fence_after)
                .map(|unread| {
                    format!(
                        "the datastore's heartbeats could not be read for {} ms",
                        unread.as_millis()
                    )
                })
        });
        drop(ds);
        let Some(reason) = reason else {
            return false;
        };
        lock(&st.isolation).isolated = Some(reason.clone());
        drop_event_raw(
            &self.events,
            "isolated",
            None,
            Some(&st.given),
            Some(&self.config.name),
            format!("lost datastore {}: {reason}", st.given),
        );
        self.respond(store, &reason);
        true
    }

    /// Powers off (or keeps) each VM this agent runs on datastore `store`, as its
    /// `[ha] isolation` or the host's `isolation_response` says.
    fn respond(&self, store: usize, reason: &str) {
        let running: Vec<String> = lock(&self.vms)
            .iter()
            .filter(|((on, _), vm)| *on == store && vm.child.is_some())
            .map(|((_, path), _)| path.clone())
            .collect();
        for path in running {
            // vm.toml cannot be read from a lost datastore: the response was noted at start.
            let response = lock(&self.vms)
                .get(&(store, path.clone()))
                .and_then(|vm| vm.isolation)
                .unwrap_or(self.config.isolation_response);
            match response {
                IsolationResponse::Keep => {
                    self.vm_event(
                        store,
                        "vm-kept",
                        &path,
                        "isolation response keep: left running, unable to write".to_string(),
                    );
                    lock(&self.stores[store].isolation).kept.push(path);
                }
                IsolationResponse::PowerOff => match self.stop_vm(store, &path, POWER_OFF_GRACE) {
                    Ok(()) => self.vm_event(
                        store,
                        "vm-powered-off",
                        &path,
                        format!("host isolated ({reason}): powered off to restart elsewhere"),
                    ),
                    Err(e) => {
                        tracing::warn!(vm = %path, error = %e, "powering off an isolated VM failed");
                    }
                },
            }
        }
    }

    /// Joins datastore `store` again as a new incarnation, with a new host record. True
    /// once it has.
    fn rejoin(&self, store: usize) -> bool {
        let st = &self.stores[store];
        let mut options = vmfs::OpenOptions::read_write();
        options.host_name = self.config.name.clone();
        let fresh = match Datastore::open(st.lun.clone(), &options) {
            Ok(ds) => ds,
            Err(e) => {
                tracing::debug!(datastore = %st.given, error = %e, "the datastore is still out of reach");
                return false;
            }
        };
        let slot = fresh.host_slot();
        // The record's handle belongs to the fenced incarnation: it goes with it.
        drop(lock(&st.record).take());
        let old = std::mem::replace(&mut *lock(&st.ds), Arc::new(fresh));
        // A fenced slot is left for the other hosts to recover; closing only releases it here.
        if let Ok(old) = Arc::try_unwrap(old) {
            if let Err(e) = old.close() {
                tracing::info!(datastore = %st.given, error = %e, "leaving the fenced host slot");
            }
        }
        let was = lock(&st.isolation).isolated.take().unwrap_or_default();
        self.heartbeats_read(store, true);
        drop_event_raw(
            &self.events,
            "rejoined",
            None,
            Some(&st.given),
            Some(&self.config.name),
            format!(
                "datastore {} answers again; host slot {} (isolated: {was})",
                st.given,
                slot.map_or_else(|| "-".to_string(), |s| s.to_string())
            ),
        );
        self.reopen_record(store);
        let kept = std::mem::take(&mut lock(&st.isolation).kept);
        self.power_off_fenced(store, kept);
        true
    }

    /// Opens this host's record on datastore `store` again, for its new incarnation, and
    /// publishes it. The fenced incarnation's lock on it may outlive it until another host
    /// recovers its slot: then the next tick tries again.
    fn reopen_record(&self, store: usize) {
        let st = &self.stores[store];
        match open_record(&st.ds(), &self.config.name) {
            Ok(record) => {
                *lock(&st.record) = Some((record, None));
                if let Err(e) = self.publish_on(store) {
                    tracing::warn!(datastore = %st.given, error = %e, "publishing this host's record after rejoining failed");
                }
            }
            Err(e) => {
                tracing::info!(datastore = %st.given, error = %e, "this host's record is not writable yet");
            }
        }
    }

    /// Powers off each kept VM whose runner no longer renews a live host slot: it was fenced
    /// while the host was isolated, so its guest can never write again and its lock is
    /// another host's to take. When the heartbeats cannot be read yet, the next tick looks
    /// again.
    fn power_off_fenced(&self, store: usize, kept: Vec<String>) {
        if kept.is_empty() {
            return;
        }
        let st = &self.stores[store];
        // Renewals come every io_timeout: two of them show whether a runner still renews.
        let watch = st.ds().timing().io_timeout * 2;
        let survey = match vmfs::cluster::survey::survey(st.lun.clone(), watch) {
            Ok(survey) => survey,
            Err(e) => {
                tracing::warn!(datastore = %st.given, error = %e, "reading heartbeats after rejoining failed");
                lock(&st.isolation).kept.extend(kept);
                return;
            }
        };
        for path in &kept {
            let Some(pid) = lock(&self.vms)
                .get(&(store, path.clone()))
                .and_then(|vm| vm.child.as_ref().map(std::process::Child::id))
            else {
                continue;
            };
            let renewing = survey.hosts.iter().any(|h| {
                h.pid == pid && h.host_name == self.config.name && h.state == "live" && h.renewing
            });
            if renewing {
                continue;
            }
            match self.stop_vm(store, path, POWER_OFF_GRACE) {
                Ok(()) => self.vm_event(
                    store,
                    "vm-powered-off",
                    path,
                    "kept while the host was isolated, but its runner was fenced: it can no longer write and its lock is lost".to_string(),
                ),
                Err(e) => {
                    tracing::warn!(vm = %path, error = %e, "powering off a fenced VM failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IsolationResponse;
    use crate::{Config, Ha};

    const HOST: &str =
        "name = \"esx-a\"\ndatastores = [\"nbd://10.0.0.1/ds\"]\nruntime_dir = \"/run/vapp\"\n";

    #[test]
    fn host_response_defaults_to_power_off_and_takes_keep() {
        let config = Config::parse("host.toml", HOST).unwrap();
        assert_eq!(config.isolation_response, IsolationResponse::PowerOff);
        let keep = format!("{HOST}isolation_response = \"keep\"\n");
        let config = Config::parse("host.toml", &keep).unwrap();
        assert_eq!(config.isolation_response, IsolationResponse::Keep);
    }

    #[test]
    fn an_unknown_response_is_refused_with_its_name() {
        let bad = format!("{HOST}isolation_response = \"reboot\"\n");
        let e = Config::parse("host.toml", &bad).unwrap_err().to_string();
        assert!(e.contains("host.toml") && e.contains("reboot"), "{e}");
    }

    #[test]
    fn a_vm_overrides_the_host_response() {
        let ha: Ha = toml::from_str("restart = true\nisolation = \"keep\"\n").unwrap();
        assert_eq!(ha.isolation, Some(IsolationResponse::Keep));
        let ha: Ha = toml::from_str("restart = true\n").unwrap();
        assert_eq!(ha.isolation, None);
    }
}
