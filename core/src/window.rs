//! Time-weighted concurrency windows (placeholder; see issue 5).
