//! Durations on the command line and in env vars, written as `"250ms"`, `"5s"`, `"100us"` or
//! `"0"`, the same form as the rest of the project's configuration.

use std::time::Duration;

/// Parses `"<integer><unit>"` with unit `us`, `ms`, `s` or `m`; a bare `"0"` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {text:?} has no unit: write e.g. \"5ms\", \"2s\""))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("duration {text:?} must start with a whole number, e.g. \"5ms\""))?;
    match unit {
        "us" | "µs" => Ok(Duration::from_micros(value)),
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value.saturating_mul(60))),
        _ => Err(format!(
            "duration {text:?} has unknown unit {unit:?}: use us, ms, s or m"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let cases = [
            ("zero", "0", Ok(Duration::ZERO)),
            ("zero with unit", "0ms", Ok(Duration::ZERO)),
            ("micros", "100us", Ok(Duration::from_micros(100))),
            ("millis", "250ms", Ok(Duration::from_millis(250))),
            ("seconds", "5s", Ok(Duration::from_secs(5))),
            ("minutes", "2m", Ok(Duration::from_secs(120))),
            ("spaces", " 3ms ", Ok(Duration::from_millis(3))),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_duration(input), want, "{name}");
        }
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        for input in ["", "5", "ms", "5h", "-1ms", "1.5s"] {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains("duration"), "{input}: {err}");
        }
    }
}
