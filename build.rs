//! Finds the recorded PNCP responses that some collector and composite tests replay. They are real
//! third-party responses and never enter the repository: they live beside it, in
//! `../shared/fixtures/pncp`. Where that folder exists the tests get `cfg(recorded_pncp)` and run;
//! elsewhere they are compiled as ignored, with the reason, and this script says which.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(recorded_pncp)");
    println!("cargo::rerun-if-changed=build.rs");
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let recorded = manifest_dir.map(|d| d.join("../shared/fixtures/pncp"));
    match recorded {
        Some(dir) if dir.is_dir() => {
            // Only an existing path: a missing one would make Cargo rerun this script, and rebuild
            // the crate, on every build.
            println!("cargo::rerun-if-changed={}", dir.display());
            println!("cargo::rustc-cfg=recorded_pncp");
        }
        _ => println!(
            "cargo::warning=the tests collector::recorded::* and composite::recorded::* are skipped: \
             they need the recorded PNCP responses in ../shared/fixtures/pncp (add the folder, then \
             `touch build.rs`)"
        ),
    }
}
