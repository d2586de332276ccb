//! `Config::parse` on arbitrary bytes: never panics; a config it accepts is consistent (every
//! revision's name maps back to it in the table).
#![no_main]

use inflight_core::{Config, RevisionId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Config::parse(data) {
        for (i, r) in c.revisions.iter().enumerate() {
            assert_eq!(c.table.match_name(&r.name), Some(RevisionId(i)));
            let _ = r.limits(0);
            let _ = r.limits(u32::MAX);
            let _ = r.effective_target();
        }
    }
});
