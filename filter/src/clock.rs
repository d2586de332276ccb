//! Monotonic milliseconds that mean the same on every worker VM of one Envoy process.
//!
//! Waiter ages are compared across VMs (reaping), so each VM's own `Instant` origin will not do.
//! WASI's monotonic clock is the host's steady clock (Envoy: `monotonicTime()`), shared by all
//! VMs of the process; proxy-wasm's own time call is wall-clock and may jump.

#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
    }
    const CLOCK_MONOTONIC: u32 = 1;

    pub fn now_ms() -> u64 {
        let mut t: u64 = 0;
        // SAFETY: `t` is a valid, writable u64 for the duration of the call.
        let errno = unsafe { clock_time_get(CLOCK_MONOTONIC, 1_000_000, &mut t) };
        if errno != 0 {
            return 0;
        }
        t / 1_000_000
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    // Native builds exist for clippy and docs only; the filter never runs natively.
    pub fn now_ms() -> u64 {
        use std::sync::OnceLock;
        use std::time::Instant;
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

pub use imp::now_ms;
