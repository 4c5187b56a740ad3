//! Builds the test guest (guest/: a freestanding PVH kernel in C and assembly) with the host's
//! gcc, so `cargo test -p hv` needs nothing else. Without gcc the crate still builds and
//! `hv::test_guest::image()` explains what is missing.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 3] = ["guest/entry.S", "guest/main.c", "guest/guest.ld"];

fn main() -> Result<(), String> {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=CC");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let image = out_dir.join("testguest.elf");
    let compiler = env::var("HV_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());

    if Command::new(&compiler).arg("--version").output().is_err() {
        println!(
            "cargo:warning=hv: {compiler} not found, the test guest is not built (install gcc)"
        );
        std::fs::write(&image, []).map_err(|e| format!("{}: {e}", image.display()))?;
        return Ok(());
    }

    let output = Command::new(&compiler)
        .args([
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-ffreestanding",
            "-fno-builtin",
            "-nostdlib",
            "-static",
            "-fno-pie",
            "-no-pie",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-fno-asynchronous-unwind-tables",
            // The PVM emulator implements no SSE/x87/XSAVE; the kernel has no red zone.
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-Wl,-T,guest/guest.ld",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,-z,max-page-size=0x1000",
            "guest/entry.S",
            "guest/main.c",
            "-o",
        ])
        .arg(&image)
        .output()
        .map_err(|e| format!("running {compiler}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the test guest with {compiler} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
