//! The README's first command, end to end: the bundled nycflights13 tables sent through
//! the socket by concurrent clients equal a direct load of the same data.

use std::process::Command;

#[test]
fn demo_loads_every_table_exactly_as_the_source() {
    let output = Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .arg("demo")
        .output()
        .expect("run pgspool demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for table in ["airlines", "airports", "planes", "weather", "flights"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(table))
            .unwrap_or_else(|| panic!("no line for {table}:\n{stdout}"));
        assert!(line.ends_with("yes"), "{table} differs: {line}");
    }
    assert!(stdout.contains("each row arrived exactly once"), "{stdout}");
}
