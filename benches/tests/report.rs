//! bench-report on a criterion directory made by hand: ratios with their goals, and figures
//! that are not times with their upper bounds from the goals' `max` table.

use std::fs;
use std::path::Path;
use std::process::Command;

fn measured(dir: &Path, group: &str, function: &str, mean_ns: f64) {
    let d = dir.join(group).join(function).join("new");
    fs::create_dir_all(&d).expect("mkdir");
    fs::write(
        d.join("benchmark.json"),
        format!(r#"{{"group_id":"{group}","function_id":"{function}","throughput":null}}"#),
    )
    .expect("benchmark.json");
    fs::write(
        d.join("estimates.json"),
        format!(r#"{{"mean":{{"point_estimate":{mean_ns}}}}}"#),
    )
    .expect("estimates.json");
}

#[test]
fn figures_are_printed_with_their_bound_beside_the_ratios() {
    let dir = tempfile::tempdir().expect("tempdir");
    let criterion = dir.path().join("criterion");
    measured(&criterion, "repl_resync", "baseline", 300e6);
    measured(&criterion, "repl_resync", "after_1pct_changed", 5e6);
    // What the bench leaves beside its group's results.
    fs::create_dir_all(criterion.join("repl_crash")).expect("mkdir");
    fs::write(
        criterion.join("repl_crash/bytes_resynced.figure.json"),
        r#"{"group":"repl_crash","name":"bytes_resynced","value":67108864.0,"unit":"bytes"}"#,
    )
    .expect("figure");
    let goals = dir.path().join("goals.toml");
    fs::write(
        &goals,
        "\"repl_resync/after_1pct_changed\" = 33.3\nmax.\"repl_crash/bytes_resynced\" = 67108864\n\"later/line\" = 1.0\n",
    )
    .expect("goals");

    let out = Command::new(env!("CARGO_BIN_EXE_bench-report"))
        .arg(&criterion)
        .arg(&goals)
        .output()
        .expect("run bench-report");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench-report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ratio = stdout
        .lines()
        .find(|l| l.contains("after_1pct_changed"))
        .unwrap_or_else(|| panic!("no ratio row in:\n{stdout}"));
    assert!(
        ratio.contains("60.00x") && ratio.contains("≥33.30"),
        "{ratio}"
    );
    let figure = stdout
        .lines()
        .find(|l| l.contains("bytes_resynced"))
        .unwrap_or_else(|| panic!("no figure row in:\n{stdout}"));
    assert!(
        figure.contains("repl_crash")
            && figure.contains("64.0 MiB")
            && figure.contains("≤64.0 MiB"),
        "{figure}"
    );
}
