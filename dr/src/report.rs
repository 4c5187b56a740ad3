//! What a drill did, as JSON (one record per drill, kept as history) and as a page a
//! person reads.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// How a VM of the drill ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Verified,
    Failed,
    /// Never started: the drill stopped before its priority group.
    NotStarted,
}

/// One VM of the drill. Times are ms from the drill's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    pub path: String,
    pub datastore: String,
    pub priority: u32,
    pub verify: String,
    /// When `vm start` was run.
    pub start_ms: Option<u64>,
    /// When its process said the VM runs (before any guest code).
    pub running_ms: Option<u64>,
    /// When its verification passed or failed.
    pub done_ms: Option<u64>,
    pub outcome: Outcome,
    /// Why it failed, or what verified it.
    pub detail: String,
}

impl VmResult {
    /// From `vm start` to verified: the VM's boot time as the plan judges it.
    pub fn boot_ms(&self) -> Option<u64> {
        match (self.start_ms, self.done_ms, self.outcome) {
            (Some(s), Some(d), Outcome::Verified) => Some(d.saturating_sub(s)),
            _ => None,
        }
    }
}

/// The point the drill's copies were taken at, per replica (LUN or group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub replica: String,
    pub luns: Vec<String>,
    pub mode: String,
    /// When the point's data was current at the protected site (ms since the epoch).
    pub point_unix_ms: u64,
    /// Its age when the copies were taken: the RPO the drill measured.
    pub rpo_ms: u64,
    pub session: String,
}

/// One step of a failover (stop at the other site, final sync, promote, start, verify).
/// Times are ms from the record's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    /// Where it ran: `protected` (the other site, as it reported) or `here`.
    pub site: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub detail: String,
}

/// One drill, from start to report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub plan: String,
    pub drill: String,
    /// `test` (a drill on copies), `failover-planned` or `failover-unplanned`.
    #[serde(default = "test_kind")]
    pub kind: String,
    /// ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Taking the copies at one point.
    pub snapshot_ms: u64,
    /// Resignaturing the datastore copies.
    pub open_ms: u64,
    /// The network the VMs' NICs went on instead of their vm.toml's: the drill's own
    /// isolated network, or a failover's recovery network; none when they kept theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Creating the drill's isolated network (part of the RTO, after the copies).
    #[serde(default)]
    pub network_ms: u64,
    pub points: Vec<PointRecord>,
    /// The oldest point's age.
    pub rpo_ms: Option<u64>,
    pub rpo_target_s: Option<u64>,
    /// From the drill's start to its last VM verified; none when a VM failed.
    pub rto_ms: Option<u64>,
    pub rto_target_s: Option<u64>,
    /// The resignatured copies: replica LUN session → the copy's datastore name.
    pub copies: Vec<(String, String)>,
    pub vms: Vec<VmResult>,
    /// A failover's steps in order; empty for a drill.
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    /// What went wrong, one line each; empty when the drill passed.
    pub failures: Vec<String>,
    pub passed: bool,
}

impl DrillRecord {
    /// A record of a drill or failover of `plan` that starts now: nothing measured yet.
    pub fn begin(
        plan: &crate::plan::Plan,
        drill: String,
        kind: &str,
        started_unix_ms: u64,
    ) -> Self {
        DrillRecord {
            plan: plan.name.clone(),
            drill,
            kind: kind.to_string(),
            started_unix_ms,
            snapshot_ms: 0,
            open_ms: 0,
            network: None,
            network_ms: 0,
            points: Vec::new(),
            rpo_ms: None,
            rpo_target_s: plan.rpo_target_s,
            rto_ms: None,
            rto_target_s: plan.rto_target_s,
            copies: Vec::new(),
            vms: Vec::new(),
            steps: Vec::new(),
            failures: Vec::new(),
            passed: false,
        }
    }

    /// Before the first VM starts: copies, their resignature, the drill's network.
    pub fn prep_ms(&self) -> u64 {
        self.snapshot_ms + self.open_ms + self.network_ms
    }

    /// Judges the record against the plan's targets, fills `rto_ms`, `failures`, `passed`.
    pub fn conclude(&mut self) {
        for vm in &self.vms {
            if vm.outcome != Outcome::Verified {
                self.failures
                    .push(format!("{} ({}): {}", vm.path, vm.datastore, vm.detail));
            }
        }
        let done = self.vms.iter().filter_map(|v| v.done_ms).max();
        self.rto_ms = if self.failures.is_empty() {
            Some(done.unwrap_or(self.prep_ms()))
        } else {
            None
        };
        if let (Some(rpo), Some(target)) = (self.rpo_ms, self.rpo_target_s)
            && rpo > target * 1000
        {
            self.failures.push(format!(
                "RPO {} is over the plan's target of {target} s",
                secs(rpo)
            ));
        }
        if let (Some(rto), Some(target)) = (self.rto_ms, self.rto_target_s)
            && rto > target * 1000
        {
            self.failures.push(format!(
                "RTO {} is over the plan's target of {target} s",
                secs(rto)
            ));
        }
        self.passed = self.failures.is_empty();
    }

    /// The report as a self-contained HTML page (inline CSS, no script).
    pub fn html(&self) -> String {
        let mut h = String::new();
        let verdict = if self.passed { "passed" } else { "FAILED" };
        let colour = if self.passed { "#1a7f37" } else { "#cf222e" };
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>DR {kind} {drill} of plan {plan}: {verdict}</title>\n<style>\
             body{{font-family:sans-serif;margin:2em;color:#1f2328}}\
             table{{border-collapse:collapse;margin:1em 0}}\
             td,th{{border:1px solid #d0d7de;padding:4px 10px;text-align:left}}\
             th{{background:#f6f8fa}}.ok{{color:#1a7f37}}.bad{{color:#cf222e}}\
             .lane{{position:relative;height:18px;background:#f6f8fa;width:600px}}\
             .bar{{position:absolute;height:18px}}.boot{{background:#54aeff}}\
             .fail{{background:#ff8182}}.prep{{background:#d4a72c}}\
             </style></head><body>\n<h1>DR {kind} <code>{drill}</code> of plan <code>{plan}</code>: \
             <span style=\"color:{colour}\">{verdict}</span></h1>\n<p>Started {started}.</p>\n",
            drill = esc(&self.drill),
            kind = esc(&self.kind),
            plan = esc(&self.plan),
            started = utc(self.started_unix_ms),
        );
        h.push_str("<h2>Targets</h2>\n<table><tr><th></th><th>measured</th><th>target</th><th></th></tr>\n");
        for (what, got, target) in [
            (
                "RPO (age of the copies' point)",
                self.rpo_ms,
                self.rpo_target_s,
            ),
            (
                "RTO (drill start to last VM verified)",
                self.rto_ms,
                self.rto_target_s,
            ),
        ] {
            let met = match (got, target) {
                (Some(g), Some(t)) if g <= t * 1000 => "<span class=ok>met</span>",
                (Some(_), Some(_)) => "<span class=bad>missed</span>",
                (None, _) => "<span class=bad>not reached</span>",
                (Some(_), None) => "",
            };
            let _ = writeln!(
                h,
                "<tr><td>{what}</td><td>{}</td><td>{}</td><td>{met}</td></tr>",
                got.map_or("-".into(), secs),
                target.map_or("-".into(), |t| format!("{t} s")),
            );
        }
        if !self.steps.is_empty() {
            h.push_str("</table>\n<h2>Steps</h2>\n<table><tr><th>step</th><th>site</th><th>from</th><th>to</th><th>took</th><th>detail</th></tr>\n");
            for s in &self.steps {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&s.step),
                    esc(&s.site),
                    secs(s.start_ms),
                    secs(s.end_ms),
                    secs(s.end_ms.saturating_sub(s.start_ms)),
                    esc(&s.detail)
                );
            }
        }
        h.push_str("</table>\n<h2>Copies</h2>\n<table><tr><th>replica</th><th>mode</th><th>point</th><th>age</th><th>session</th></tr>\n");
        for p in &self.points {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&format!("{} ({})", p.replica, p.luns.join(", "))),
                esc(&p.mode),
                utc(p.point_unix_ms),
                secs(p.rpo_ms),
                esc(&p.session)
            );
        }
        let network = match (&self.network, self.kind.as_str()) {
            (Some(n), "test") => format!(
                "; creating the drill's isolated network <code>{}</code>: {}",
                esc(n),
                secs(self.network_ms)
            ),
            (Some(n), _) => format!("; NICs on the recovery network <code>{}</code>", esc(n)),
            (None, _) => String::new(),
        };
        let _ = writeln!(
            h,
            "</table>\n<p>Taking the copies: {}; opening them (resignature): {}{network}.</p>",
            secs(self.snapshot_ms),
            secs(self.open_ms)
        );
        let span = self
            .vms
            .iter()
            .filter_map(|v| v.done_ms)
            .max()
            .unwrap_or(0)
            .max(self.prep_ms())
            .max(1) as f64;
        let pct = |ms: u64| ms as f64 * 100.0 / span;
        h.push_str("<h2>Timeline</h2>\n<table><tr><th>priority</th><th>VM</th><th>verification</th><th>start</th><th>running</th><th>done</th><th>boot</th><th>result</th><th style=\"width:600px\">0 .. ");
        h.push_str(&secs(span as u64));
        h.push_str("</th></tr>\n");
        let prep = self.prep_ms();
        let _ = writeln!(
            h,
            "<tr><td></td><td>copies</td><td></td><td>0</td><td></td><td>{}</td><td></td><td></td>\
             <td><div class=lane><div class=\"bar prep\" style=\"left:0;width:{:.1}%\"></div></div></td></tr>",
            secs(prep),
            pct(prep)
        );
        for v in &self.vms {
            let (class, result) = match v.outcome {
                Outcome::Verified => ("ok", "verified"),
                Outcome::Failed => ("bad", "failed"),
                Outcome::NotStarted => ("bad", "not started"),
            };
            let bar = match (v.start_ms, v.done_ms) {
                (Some(s), Some(d)) => format!(
                    "<div class=\"bar {}\" style=\"left:{:.1}%;width:{:.1}%\"></div>",
                    if v.outcome == Outcome::Verified {
                        "boot"
                    } else {
                        "fail"
                    },
                    pct(s),
                    (pct(d) - pct(s)).max(0.5)
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class={class} title=\"{}\">{result}</td><td><div class=lane>{bar}</div></td></tr>",
                v.priority,
                esc(&format!("{} ({})", v.path, v.datastore)),
                esc(&v.verify),
                v.start_ms.map_or("-".into(), secs),
                v.running_ms.map_or("-".into(), secs),
                v.done_ms.map_or("-".into(), secs),
                v.boot_ms().map_or("-".into(), secs),
                esc(&v.detail),
            );
        }
        h.push_str("</table>\n<h2>What failed</h2>\n");
        if self.failures.is_empty() {
            h.push_str(
                "<p class=ok>Nothing: every VM was verified within the plan's targets.</p>\n",
            );
        } else {
            h.push_str("<ul>\n");
            for f in &self.failures {
                let _ = writeln!(h, "<li class=bad>{}</li>", esc(f));
            }
            h.push_str("</ul>\n");
        }
        h.push_str("</body></html>\n");
        h
    }
}

fn test_kind() -> String {
    "test".into()
}

/// Milliseconds as seconds with a millisecond, e.g. `1.234 s`.
pub fn secs(ms: u64) -> String {
    format!("{}.{:03} s", ms / 1000, ms % 1000)
}

/// ms since the Unix epoch as `2026-12-04 11:27:41.123 UTC`.
pub fn utc(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("@{} s", ms / 1000))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DrillRecord {
        DrillRecord {
            plan: "p".into(),
            drill: "d1".into(),
            kind: "test".into(),
            started_unix_ms: 1,
            snapshot_ms: 20,
            open_ms: 300,
            network: Some("drill-k3x9".into()),
            network_ms: 40,
            points: vec![],
            rpo_ms: Some(1500),
            rpo_target_s: Some(1),
            rto_ms: None,
            rto_target_s: Some(60),
            copies: vec![],
            vms: vec![VmResult {
                path: "/vms/<a>".into(),
                datastore: "ds".into(),
                priority: 1,
                verify: "ready".into(),
                start_ms: Some(400),
                running_ms: Some(450),
                done_ms: Some(1400),
                outcome: Outcome::Verified,
                detail: "ready line seen".into(),
            }],
            steps: vec![],
            failures: vec![],
            passed: false,
        }
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(1_796_383_661_233), "2026-12-04 11:27:41.233 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000 UTC");
    }

    #[test]
    fn a_missed_target_fails_the_drill_and_the_page_says_why() {
        let mut r = record();
        r.conclude();
        assert_eq!(r.rto_ms, Some(1400));
        assert!(!r.passed);
        assert_eq!(
            r.failures,
            vec!["RPO 1.500 s is over the plan's target of 1 s"]
        );
        let page = r.html();
        assert!(page.contains("RPO 1.500 s is over"));
        assert!(page.contains("/vms/&lt;a&gt;"), "names are escaped");
        assert!(
            page.contains("isolated network <code>drill-k3x9</code>: 0.040 s"),
            "{page}"
        );
        assert!(!page.contains("<script"));
    }

    #[test]
    fn a_failovers_steps_are_timed_on_its_page() {
        let mut r = record();
        r.kind = "failover-planned".into();
        r.steps.push(StepRecord {
            step: "stop /vms/<a>".into(),
            site: "protected (10.0.0.1:7788)".into(),
            start_ms: 5,
            end_ms: 1205,
            detail: "stopped".into(),
        });
        r.conclude();
        let page = r.html();
        assert!(page.contains("<h2>Steps</h2>"), "{page}");
        assert!(page.contains("stop /vms/&lt;a&gt;"), "{page}");
        assert!(page.contains("1.200 s"), "{page}");
    }
}
