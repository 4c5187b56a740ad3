//! Prints every criterion benchmark group as ratios against its `baseline`, measured in the same
//! run: ratio = time(baseline) / time(variant), so above 1.0 means the variant is faster.
//! Goals from benches/goals.toml are shown next to the figures they judge. Figures that are
//! not times (`vapp_benches::write_figure`) follow, each with its upper bound from the
//! goals' `max` table.
//!
//! Usage: bench-report [CRITERION_DIR] [GOALS_TOML]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use vapp_benches::{FIGURE_SUFFIX, Figure};

#[derive(Deserialize)]
struct BenchmarkId {
    group_id: String,
    function_id: Option<String>,
    throughput: Option<Throughput>,
}

#[derive(Deserialize)]
enum Throughput {
    Bytes(u64),
    BytesDecimal(u64),
    Elements(u64),
}

#[derive(Deserialize)]
struct Estimates {
    mean: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
}

struct Measurement {
    mean_ns: f64,
    throughput: Option<Throughput>,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let criterion_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(vapp_benches::criterion_dir);
    let goals_path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("goals.toml"));
    let goals = match fs::read_to_string(&goals_path) {
        Ok(text) => Goals::parse(&text).with_context(|| format!("{}", goals_path.display()))?,
        Err(_) => Goals::default(),
    };

    let mut groups: BTreeMap<String, BTreeMap<String, Measurement>> = BTreeMap::new();
    let mut figures = Vec::new();
    collect(&criterion_dir, &mut groups, &mut figures)
        .with_context(|| format!("reading {}", criterion_dir.display()))?;
    if groups.is_empty() {
        anyhow::bail!("no criterion results under {}", criterion_dir.display());
    }

    println!(
        "{:<44} {:<18} {:>12} {:>14} {:>9} {:>7}",
        "group", "variant", "mean", "throughput", "ratio", "goal"
    );
    for (group, variants) in &groups {
        let baseline = variants.get("baseline").map(|m| m.mean_ns);
        for (name, m) in variants {
            let ratio = match baseline {
                Some(b) if name != "baseline" => format!("{:.2}x", b / m.mean_ns),
                _ => "-".to_string(),
            };
            let goal = goals
                .ratios
                .get(&format!("{group}/{name}"))
                .map(|g| format!("≥{g:.2}"))
                .unwrap_or_default();
            println!(
                "{:<44} {:<18} {:>12} {:>14} {:>9} {:>7}",
                group,
                name,
                human_time(m.mean_ns),
                m.throughput
                    .as_ref()
                    .map(|t| rate(t, m.mean_ns))
                    .unwrap_or_default(),
                ratio,
                goal
            );
        }
    }
    if !figures.is_empty() {
        println!();
        println!(
            "{:<44} {:<18} {:>12} {:>9}",
            "group", "figure", "value", "goal"
        );
    }
    figures.sort_by(|a, b| (&a.group, &a.name).cmp(&(&b.group, &b.name)));
    for f in &figures {
        let goal = goals
            .max
            .get(&format!("{}/{}", f.group, f.name))
            .map(|g| format!("≤{}", human_value(*g, &f.unit)))
            .unwrap_or_default();
        println!(
            "{:<44} {:<18} {:>12} {:>9}",
            f.group,
            f.name,
            human_value(f.value, &f.unit),
            goal
        );
    }
    Ok(())
}

/// goals.toml: top-level keys are minimum ratios; the `max` table holds upper bounds of
/// figures, in the figure's unit.
#[derive(Default)]
struct Goals {
    ratios: BTreeMap<String, f64>,
    max: BTreeMap<String, f64>,
}

impl Goals {
    fn parse(text: &str) -> Result<Goals> {
        let table: toml::Table = toml::from_str(text)?;
        let mut goals = Goals::default();
        for (key, value) in table {
            match value {
                toml::Value::Table(max) if key == "max" => {
                    for (k, v) in max {
                        goals.max.insert(k.clone(), number(&k, &v)?);
                    }
                }
                v => {
                    goals.ratios.insert(key.clone(), number(&key, &v)?);
                }
            }
        }
        Ok(goals)
    }
}

fn number(key: &str, v: &toml::Value) -> Result<f64> {
    match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => anyhow::bail!("goal {key}: {other} is not a number"),
    }
}

fn human_value(value: f64, unit: &str) -> String {
    if unit == "bytes" {
        format!("{:.1} MiB", value / (1 << 20) as f64)
    } else {
        format!("{value} {unit}")
    }
}

/// Walks criterion's output: every `<...>/new/benchmark.json` is one measured function.
/// Every `<group>/<name>.figure.json` is one figure.
fn collect(
    dir: &Path,
    groups: &mut BTreeMap<String, BTreeMap<String, Measurement>>,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.is_dir() {
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(FIGURE_SUFFIX))
            {
                figures.push(
                    serde_json::from_str(&fs::read_to_string(&path)?)
                        .with_context(|| format!("{}", path.display()))?,
                );
            }
            continue;
        }
        let id_file = path.join("new/benchmark.json");
        if id_file.exists() {
            let id: BenchmarkId = serde_json::from_str(&fs::read_to_string(&id_file)?)
                .with_context(|| format!("{}", id_file.display()))?;
            let estimates: Estimates =
                serde_json::from_str(&fs::read_to_string(path.join("new/estimates.json"))?)?;
            groups.entry(id.group_id).or_default().insert(
                id.function_id.unwrap_or_else(|| "-".to_string()),
                Measurement {
                    mean_ns: estimates.mean.point_estimate,
                    throughput: id.throughput,
                },
            );
        } else {
            collect(&path, groups, figures)?;
        }
    }
    Ok(())
}

fn human_time(ns: f64) -> String {
    match ns {
        n if n >= 1e9 => format!("{:.2} s", n / 1e9),
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.0} ns"),
    }
}

fn rate(throughput: &Throughput, ns: f64) -> String {
    let per_second = |n: u64| n as f64 / (ns / 1e9);
    match *throughput {
        Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
            format!("{:.0} MiB/s", per_second(n) / (1 << 20) as f64)
        }
        Throughput::Elements(n) => format!("{:.0} op/s", per_second(n)),
    }
}
