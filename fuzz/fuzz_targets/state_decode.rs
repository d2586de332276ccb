//! Shared-data decoders on arbitrary bytes (another VM version, corruption): `RevisionState`
//! and `Wake` never panic, and what decodes re-encodes to a value that decodes the same.
#![no_main]

use inflight_core::wake::Wake;
use inflight_core::RevisionState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = RevisionState::decode(data) {
        let again = RevisionState::decode(&s.encode()).expect("re-encoded state decodes");
        assert_eq!(again, s);
    }
    if let Ok(w) = Wake::decode(data) {
        assert_eq!(Wake::decode(&w.encode()).as_ref(), Ok(&w));
    }
});
