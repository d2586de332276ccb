//! The WASI preview1 calls a Rust `wasm32-wasip1` cdylib makes, implemented here rather than
//! with wasmtime-wasi so that both clocks read the host's virtual clock, randomness is seeded
//! per VM (runs are reproducible), and stdout/stderr land in the test's log capture.

use wasmtime::{Caller, Linker};

use super::abi::{read, write, VmData};
use super::{LogLevel, LogLine};

const MODULE: &str = "wasi_snapshot_preview1";
const SUCCESS: u32 = 0;
const EBADF: u32 = 8;
const EINVAL: u32 = 28;
const ENOSYS: u32 = 52;

type C<'a> = Caller<'a, VmData>;
type R = wasmtime::Result<u32>;

/// The exit of a module that called `proc_exit`: a trap carrying the code.
#[derive(Debug)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// SplitMix64: a tiny deterministic generator for `random_get`.
pub fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn u32_at(c: &mut C<'_>, ptr: u32) -> Option<u32> {
    let b = read(c, ptr, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn put_u32(c: &mut C<'_>, ptr: u32, v: u32) -> u32 {
    if write(c, ptr, &v.to_le_bytes()) {
        SUCCESS
    } else {
        EINVAL
    }
}

/// Appends stdout/stderr bytes and turns complete lines into log lines.
fn capture(c: &mut C<'_>, fd: u32, bytes: &[u8]) {
    let d = c.data_mut();
    d.stdout.extend_from_slice(bytes);
    while let Some(nl) = d.stdout.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = d.stdout.drain(..=nl).collect();
        let message = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let mut w = d.world.borrow_mut();
        let line = LogLine {
            worker: d.worker,
            level: if fd == 1 {
                LogLevel::Stdout
            } else {
                LogLevel::Stderr
            },
            at_ms: w.now_ms(),
            message,
        };
        if w.echo_logs {
            eprintln!("{line}");
        }
        w.logs.push(line);
    }
}

pub fn add_to_linker(linker: &mut Linker<VmData>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "args_sizes_get",
        |mut c: C<'_>, argc: u32, size: u32| -> R {
            put_u32(&mut c, argc, 0);
            Ok(put_u32(&mut c, size, 0))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |_c: C<'_>, _argv: u32, _buf: u32| -> R { Ok(SUCCESS) },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| -> R {
            put_u32(&mut c, count, 0);
            Ok(put_u32(&mut c, size, 0))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |_c: C<'_>, _env: u32, _buf: u32| -> R { Ok(SUCCESS) },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: C<'_>, _id: u32, ret: u32| -> R {
            Ok(if write(&mut c, ret, &1_000_000u64.to_le_bytes()) {
                SUCCESS
            } else {
                EINVAL
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: C<'_>, id: u32, _precision: u64, ret: u32| -> R {
            let t = {
                let w = c.data().world.borrow();
                match id {
                    0 => w.epoch_ns + w.now_ns,
                    // Monotonic and CPU-time clocks: the virtual clock (never 0, like a real one).
                    _ => w.now_ns + 1_000_000_000,
                }
            };
            Ok(if write(&mut c, ret, &t.to_le_bytes()) {
                SUCCESS
            } else {
                EINVAL
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, nwritten: u32| -> R {
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            let mut total = 0u32;
            for i in 0..n {
                let (Some(ptr), Some(len)) = (
                    u32_at(&mut c, iovs + 8 * i),
                    u32_at(&mut c, iovs + 8 * i + 4),
                ) else {
                    return Ok(EINVAL);
                };
                let Some(bytes) = read(&mut c, ptr, len) else {
                    return Ok(EINVAL);
                };
                capture(&mut c, fd, &bytes);
                total += len;
            }
            Ok(put_u32(&mut c, nwritten, total))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |_c: C<'_>, _fd: u32, _iovs: u32, _n: u32, _nread: u32| -> R { Ok(EBADF) },
    )?;
    linker.func_wrap(MODULE, "fd_close", |_c: C<'_>, _fd: u32| -> R { Ok(EBADF) })?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_c: C<'_>, _fd: u32, _off: i64, _whence: u32, _ret: u32| -> R { Ok(EBADF) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: C<'_>, fd: u32, ret: u32| -> R {
            if fd > 2 {
                return Ok(EBADF);
            }
            // filetype character device, no flags, no rights.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            Ok(if write(&mut c, ret, &stat) {
                SUCCESS
            } else {
                EINVAL
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_c: C<'_>, _fd: u32, _ret: u32| -> R { Ok(EBADF) },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: u32, _p: u32, _l: u32| -> R { Ok(EBADF) },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut c: C<'_>, buf: u32, len: u32| -> R {
            let mut bytes = Vec::with_capacity(len as usize + 8);
            while bytes.len() < len as usize {
                let v = next_random(&mut c.data_mut().rng);
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            bytes.truncate(len as usize);
            Ok(if write(&mut c, buf, &bytes) {
                SUCCESS
            } else {
                EINVAL
            })
        },
    )?;
    linker.func_wrap(MODULE, "sched_yield", |_c: C<'_>| -> R { Ok(SUCCESS) })?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |_c: C<'_>, _in: u32, _out: u32, _n: u32, _ret: u32| -> R { Ok(ENOSYS) },
    )?;
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |mut c: C<'_>, code: i32| -> wasmtime::Result<()> {
            c.data_mut().exit_code = Some(code);
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    Ok(())
}
