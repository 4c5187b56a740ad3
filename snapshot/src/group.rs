//! Consistency groups: one point in time across several sources.
//!
//! Every member's gate is taken exclusively (in a fixed order, so two groups over the same
//! members cannot deadlock): writes in flight on any member finish and new ones wait.
//! Then every source is flushed and each member records the session. A write acknowledged
//! before the gates closed is in every member's session; one that waited is in none.

use std::sync::PoisonError;

use crate::engine::{check_name, lock};
use crate::error::{Result, SnapError};
use crate::{SessionInfo, Snapshots, info_of};

/// Takes a session named `name` on every member at one point in time. Refuses, changing
/// nothing, a member listed twice or one where the session cannot be taken. A crash while
/// the members record it can leave the session on some members only; they all carry the
/// same group id ([`SessionInfo::group`]) so the incomplete group is recognisable.
pub fn create_group_session(
    members: &[&Snapshots],
    name: &str,
    writable: bool,
) -> Result<Vec<SessionInfo>> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| std::sync::Arc::as_ptr(&members[i].engine) as usize);
    for pair in order.windows(2) {
        if std::sync::Arc::ptr_eq(&members[pair[0]].engine, &members[pair[1]].engine) {
            let pool = members[pair[0]].engine.pool_name().to_string();
            return Err(SnapError::BadName {
                pool,
                name: name.to_string(),
                reason: "this pool is listed twice in the consistency group".into(),
            });
        }
    }
    for m in members {
        check_name(m.engine.pool_name(), name)?;
    }
    let _gates: Vec<_> = order
        .iter()
        .map(|&i| {
            members[i]
                .engine
                .gate
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        })
        .collect();
    let mut states: Vec<_> = members.iter().map(|m| lock(&m.engine.state)).collect();
    for (m, st) in members.iter().zip(&states) {
        m.engine.check_new_session(st, name)?;
    }
    for m in members {
        m.engine.source.flush()?;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    let group = u64::from_le_bytes(id).max(1);
    let mut infos = Vec::with_capacity(members.len());
    for (m, st) in members.iter().zip(states.iter_mut()) {
        let record = m.engine.add_session(st, name, writable, group)?;
        infos.push(info_of(st, &record));
    }
    Ok(infos)
}
