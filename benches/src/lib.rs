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

/// Writes `size` bytes of `lun` from offset 0 in `source.len() / chunk` requests of `chunk`
/// bytes per submit (`source` holding one batch), then flushes: a sequential write at a
/// queue depth of one batch.
pub fn write_whole(lun: &dyn lun::Lun, source: &[u8], size: usize, chunk: usize) {
    for base in (0..size).step_by(source.len()) {
        let mut batch: Vec<lun::IoRequest<'_>> = source
            .chunks(chunk)
            .enumerate()
            .map(|(i, buf)| lun::IoRequest::Write {
                buf,
                offset: (base + i * chunk) as u64,
            })
            .collect();
        if let Err(e) = lun.submit(&mut batch) {
            panic!("{}: a benchmark write failed: {e}", lun.name());
        }
    }
    if let Err(e) = lun.flush() {
        panic!("{}: a benchmark flush failed: {e}", lun.name());
    }
}

/// Reads `size` bytes of `lun` the same way into `target` (one batch, reused).
pub fn read_whole(lun: &dyn lun::Lun, target: &mut [u8], size: usize, chunk: usize) {
    let step = target.len();
    for base in (0..size).step_by(step) {
        let mut batch: Vec<lun::IoRequest<'_>> = target
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, buf)| lun::IoRequest::Read {
                buf,
                offset: (base + i * chunk) as u64,
            })
            .collect();
        if let Err(e) = lun.submit(&mut batch) {
            panic!("{}: a benchmark read failed: {e}", lun.name());
        }
    }
}
