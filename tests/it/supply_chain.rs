//! What the crate may contain and depend on (issue 7, §7): no unsafe code of its own, a
//! committed Cargo.lock, and every dependency justified in ARCHITECTURE.md.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Both crate roots forbid unsafe code: `unsafe` anywhere in pgspool fails to compile, so
/// what needs it (signals, credentials, descriptors) comes through maintained crates.
#[test]
fn both_crate_roots_forbid_unsafe_code() {
    for root in ["src/lib.rs", "src/main.rs"] {
        assert!(
            read(root).lines().any(|l| l == "#![forbid(unsafe_code)]"),
            "{root} lacks #![forbid(unsafe_code)]"
        );
    }
}

/// Cargo.lock is tracked by git, so every build of a commit uses the same dependencies.
#[test]
fn cargo_lock_is_committed() {
    let out = Command::new("git")
        .args(["ls-files", "--error-unmatch", "Cargo.lock"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "Cargo.lock is not committed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every dependency in Cargo.toml (and in the fuzz targets' fuzz/Cargo.toml) has its line
/// in ARCHITECTURE.md's Dependencies table, and the table names no crate that is not a
/// dependency.
#[test]
fn every_dependency_is_justified_in_architecture_md() {
    let mut declared = BTreeSet::new();
    for path in ["Cargo.toml", "fuzz/Cargo.toml"] {
        let manifest: toml::Table = read(path).parse().expect("the manifest parses");
        declared.extend(
            ["dependencies", "dev-dependencies"]
                .iter()
                .filter_map(|section| manifest.get(*section).and_then(toml::Value::as_table))
                .flat_map(|table| table.keys().cloned())
                .filter(|name| name != "pgspool"),
        );
    }
    let architecture = read("ARCHITECTURE.md");
    let table = architecture
        .split("\n## Dependencies\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a Dependencies section");
    let justified: BTreeSet<String> = table
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .filter(|crates| !matches!(*crates, "crate" | "---"))
        .flat_map(|crates| crates.split(", "))
        // "criterion (dev)", "libfuzzer-sys (`fuzz/` only)": the name before the note.
        .map(|name| name.split(" (").next().unwrap_or(name).to_string())
        .collect();
    let unjustified: Vec<_> = declared.difference(&justified).collect();
    let stale: Vec<_> = justified.difference(&declared).collect();
    assert!(
        unjustified.is_empty() && stale.is_empty(),
        "dependencies without a line in ARCHITECTURE.md: {unjustified:?}; lines for crates \
         that are not dependencies: {stale:?}"
    );
}
