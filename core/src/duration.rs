//! Durations as operators write them in config: `"250ms"`, `"30s"`, `"1m30s"`, `"1.5s"`.
//!
//! The grammar is a subset of Go's `time.ParseDuration` (what Knative and Istio use), with the
//! units `us` (or `µs`), `ms`, `s`, `m` and `h`. The filter's configuration takes whole
//! milliseconds ([`parse_ms`]; Envoy ticks have millisecond granularity); the predictor's batch
//! delay takes microseconds ([`parse_us`]). One grammar for the filter, the CLI and the predictor.

use thiserror::Error;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error("empty duration; expected something like \"250ms\", \"30s\" or \"1m30s\"")]
    Empty,
    #[error("`{0}` is not a duration; expected a number and a unit (us, ms, s, m, h), like \"250ms\" or \"1m30s\"")]
    Malformed(String),
    #[error("`{0}` has no unit; write e.g. \"{0}s\" or \"{0}ms\"")]
    MissingUnit(String),
    #[error("`{input}` has an unknown unit `{unit}`; use us, ms, s, m or h")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is not a whole number of milliseconds")]
    SubMillisecond(String),
    #[error("`{0}` is not a whole number of microseconds")]
    SubMicrosecond(String),
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses a duration into whole milliseconds.
pub fn parse_ms(input: &str) -> Result<u64, DurationError> {
    let total_us = parse_us(input)?;
    if !total_us.is_multiple_of(1_000) {
        return Err(DurationError::SubMillisecond(input.to_string()));
    }
    Ok(total_us / 1_000)
}

/// Parses a duration into whole microseconds.
pub fn parse_us(input: &str) -> Result<u64, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(0);
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    // Total in microseconds so that "1.5ms" can be detected as sub-millisecond exactly.
    let mut total_us: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let number = &s[start..i];
        if number.is_empty() || number.matches('.').count() > 1 || number == "." {
            return Err(DurationError::Malformed(input.to_string()));
        }
        let unit_start = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit = &s[unit_start..i];
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(input.to_string()));
        }
        let unit_us: u128 = match unit {
            "us" | "µs" => 1,
            "ms" => 1_000,
            "s" => 1_000_000,
            "m" => 60_000_000,
            "h" => 3_600_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                })
            }
        };
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if frac.len() > 9 {
            return Err(DurationError::Malformed(input.to_string()));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| DurationError::Overflow(input.to_string()))?
        };
        let frac_num: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse()
                .map_err(|_| DurationError::Malformed(input.to_string()))?
        };
        let frac_den: u128 = 10u128.pow(frac.len() as u32);
        let frac_us = frac_num * unit_us;
        if !frac_us.is_multiple_of(frac_den) {
            return Err(DurationError::SubMicrosecond(input.to_string()));
        }
        total_us = whole
            .checked_mul(unit_us)
            .and_then(|v| v.checked_add(frac_us / frac_den))
            .and_then(|v| total_us.checked_add(v))
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
    }
    u64::try_from(total_us).map_err(|_| DurationError::Overflow(input.to_string()))
}

/// Formats milliseconds the way `parse_ms` reads them (used in docs, errors and rendered config).
pub fn format_ms(ms: u64) -> String {
    if ms != 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms != 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table() {
        let cases: &[(&str, &str, u64)] = &[
            ("millis", "250ms", 250),
            ("seconds", "30s", 30_000),
            ("minutes", "2m", 120_000),
            ("hours", "1h", 3_600_000),
            ("compound", "1m30s", 90_000),
            ("fraction", "1.5s", 1_500),
            ("leading dot", ".5s", 500),
            ("zero", "0", 0),
            ("zero with unit", "0s", 0),
            ("spaces trimmed", " 10ms ", 10),
            ("whole millis in micros", "2000us", 2),
            ("micro sign", "3000µs", 3),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_ms(input), Ok(*want), "case {name}");
        }
    }

    #[test]
    fn rejects_table() {
        let cases: &[(&str, &str, DurationError)] = &[
            ("empty", "", DurationError::Empty),
            ("bare number", "30", DurationError::MissingUnit("30".into())),
            (
                "unknown unit",
                "3d",
                DurationError::UnknownUnit {
                    input: "3d".into(),
                    unit: "d".into(),
                },
            ),
            ("words", "soon", DurationError::Malformed("soon".into())),
            (
                "two dots",
                "1.2.3s",
                DurationError::Malformed("1.2.3s".into()),
            ),
            (
                "micro",
                "1.5ms",
                DurationError::SubMillisecond("1.5ms".into()),
            ),
            ("negative", "-1s", DurationError::Malformed("-1s".into())),
            (
                "overflow",
                "99999999999999999999999999999999999999h",
                DurationError::Overflow("99999999999999999999999999999999999999h".into()),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_ms(input).as_ref(), Err(want), "case {name}");
        }
    }

    #[test]
    fn micros_for_the_predictor() {
        assert_eq!(parse_us("100us"), Ok(100));
        assert_eq!(parse_us("1.5ms"), Ok(1_500));
        assert_eq!(
            parse_ms("1500us"),
            Err(DurationError::SubMillisecond("1500us".into()))
        );
        assert_eq!(
            parse_us("0.5us"),
            Err(DurationError::SubMicrosecond("0.5us".into()))
        );
    }

    #[test]
    fn format_round_trips() {
        for ms in [0, 1, 250, 1_000, 1_500, 60_000, 90_000, 3_600_000] {
            assert_eq!(parse_ms(&format_ms(ms)), Ok(ms));
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,20}") {
            let _ = parse_ms(&s);
        }

        #[test]
        fn format_parse_identity(ms in 0u64..10_000_000_000) {
            proptest::prop_assert_eq!(parse_ms(&format_ms(ms)), Ok(ms));
        }
    }
}
