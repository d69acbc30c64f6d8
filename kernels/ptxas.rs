//! Reading ptxas's resource report (`nvcc --resource-usage`) for what must fail the build of a
//! Hopper kernel: wgmma serialized by ptxas (a silent 10× slowdown) or any register spill.
//! Shared by build.rs and its test (tests/ptxas_report.rs).

/// The problems in `log`, the report of one `_sm90a` kernel file, one line each.
pub fn hopper_problems(log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut function = "?";
    for line in log.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            function = name.trim();
        }
        let lower = line.to_ascii_lowercase();
        if lower.contains("wgmma") && lower.contains("serialized") {
            problems.push(format!("ptxas serialized wgmma: {}", line.trim()));
        }
        if let Some(spills) = spill_bytes(line) {
            if spills > 0 {
                problems.push(format!("{function} spills registers: {}", line.trim()));
            }
        }
    }
    problems
}

/// The spill stores + loads of a `N bytes stack frame, N bytes spill stores, N bytes spill
/// loads` line, or `None` for any other line.
fn spill_bytes(line: &str) -> Option<u64> {
    if !line.contains("bytes spill stores") {
        return None;
    }
    let number_before = |label: &str| -> Option<u64> {
        let head = line.split(label).next()?;
        head.rsplit(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    Some(number_before(" bytes spill stores")? + number_before(" bytes spill loads")?)
}
