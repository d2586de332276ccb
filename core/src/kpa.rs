//! KPA decider (placeholder; see issue 5).
