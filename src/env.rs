//! On/off switches read from the environment (SD21_CUDA_GRAPHS, SD21_WGMMA, HF_HUB_OFFLINE…).

/// `Some(true)` for 1/true/on/yes, `Some(false)` for 0/false/off/no (any case, spaces trimmed),
/// `None` when `name` is unset or says something else.
pub fn flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().and_then(|v| parse_flag(&v))
}

fn parse_flag(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_flag;

    #[test]
    fn reads_every_spelling_and_nothing_else() {
        for on in ["1", "true", "ON", " yes "] {
            assert_eq!(parse_flag(on), Some(true), "{on}");
        }
        for off in ["0", "False", "off", "no"] {
            assert_eq!(parse_flag(off), Some(false), "{off}");
        }
        for neither in ["", "2", "enabled"] {
            assert_eq!(parse_flag(neither), None, "{neither}");
        }
    }
}
