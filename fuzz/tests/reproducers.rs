//! The crash inputs kept in `artifacts-found/<target>/` (reproducers of real bugs), replayed
//! through the same body their fuzz target runs (`fuzz_common::replay`): none may panic now.
//! A plain `cargo test` in this crate (scripts/test.sh runs it): no cargo-fuzz, no nightly,
//! no libFuzzer run.

use std::path::{Path, PathBuf};

fn sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    v.sort();
    v
}

#[test]
fn every_kept_reproducer_runs_through_its_target_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts-found");
    let (mut replayed, mut failures) = (0, Vec::new());
    for dir in sorted(&root) {
        let target = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            fuzz_common::TARGETS.contains(&target.as_str()),
            "artifacts-found/{target}: no fuzz target of that name"
        );
        for file in sorted(&dir) {
            let data = std::fs::read(&file).unwrap();
            let name = file.strip_prefix(&root).unwrap().display().to_string();
            match std::panic::catch_unwind(|| fuzz_common::replay(&target, &data)) {
                Ok(true) => {}
                // A reproducer that no longer decodes tests nothing: the input format changed
                // under it (arbitrary's, or the target's Input).
                Ok(false) => failures.push(format!("{name}: never reached the target's body")),
                Err(p) => {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{name}: panicked: {why}"));
                }
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no reproducer in {}", root.display());
    assert!(
        failures.is_empty(),
        "{} of {replayed} kept reproducers fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("replayed {replayed} kept reproducers: no panic");
}
