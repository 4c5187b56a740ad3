//! Shared helpers for the benchmarks: where criterion writes, and figures that are not times.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where criterion keeps its results: `$CRITERION_HOME`, else `criterion` in the target
/// directory.
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// A measured quantity other than a time (bytes copied, say), kept beside the group's
/// criterion results as `<group>/<name>.figure.json` for bench-report.
#[derive(Debug, Serialize, Deserialize)]
pub struct Figure {
    pub group: String,
    pub name: String,
    pub value: f64,
    /// "bytes", or anything else printed as is after the value.
    pub unit: String,
}

/// Suffix of the files [`write_figure`] leaves in a group's directory.
pub const FIGURE_SUFFIX: &str = ".figure.json";

/// Records a figure of this run for bench-report; a failure is printed, not fatal, as the
/// bench's own output already shows the figure.
pub fn write_figure(group: &str, name: &str, value: f64, unit: &str) {
    let dir = criterion_dir().join(group);
    let figure = Figure {
        group: group.to_string(),
        name: name.to_string(),
        value,
        unit: unit.to_string(),
    };
    let path = dir.join(format!("{name}{FIGURE_SUFFIX}"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let text = serde_json::to_string_pretty(&figure).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)
    });
    if let Err(e) = written {
        eprintln!("cannot record figure {}: {e}", path.display());
    }
}
