//! Durations on the command line and in env vars, written as `"250ms"`, `"5s"`, `"100us"` or
//! `"0"`: core's grammar, the same as the filter's and the CLI's configuration.

use std::time::Duration;

/// Parses a duration with the project's one grammar (`inflight_core::duration`): `"250ms"`,
/// `"5s"`, `"100us"`, `"1m30s"`; a bare `"0"` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    inflight_core::duration::parse_us(text)
        .map(Duration::from_micros)
        .map_err(|e| format!("duration {:?}: {e}", text.trim()))
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
            ("compound", "1m30s", Ok(Duration::from_secs(90))),
            ("fraction", "1.5ms", Ok(Duration::from_micros(1_500))),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_duration(input), want, "{name}");
        }
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        for input in ["", "5", "ms", "5d", "-1ms", "1.5us"] {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains("duration"), "{input}: {err}");
        }
    }
}
