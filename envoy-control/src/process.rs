//! Child processes stopped by pid: started in their own process group when a terminal's Ctrl-C
//! must reach only their parent (which then stops them in order: drain, SIGTERM, wait), always
//! waited for, so nothing is left behind as an orphan or a zombie.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Spawns `cmd` in its own process group, with SIGTERM as its parent-death signal so that even
/// if the parent itself is killed (SIGKILL, a crash) its children do not outlive it.
///
/// The parent-death signal follows the spawning *thread*: spawn from a thread that lives as
/// long as the child should (not from a short-lived test thread whose child is shared).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `signal` to `pid`; false if there is no such process.
pub fn signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    if !signal(pid, 0) {
        return false;
    }
    // A zombie still answers kill(0); /proc says whether it has exited.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
pub fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_ends_a_process_whether_or_not_it_heeds_sigterm() {
        use std::io::BufRead as _;
        let grace = Duration::from_millis(300);
        let cases = [
            ("ends on SIGTERM", "", false),
            // An ignored signal stays ignored across exec.
            (
                "SIGTERM ignored: killed after the grace",
                "trap '' TERM; ",
                true,
            ),
        ];
        for (name, trap, waits) in cases {
            let script = format!("{trap}echo ready; exec sleep 30");
            let mut child = spawn(
                Command::new("sh")
                    .args(["-c", &script])
                    .stdout(std::process::Stdio::piped()),
            )
            .unwrap();
            // Signalled only once the shell has set its disposition.
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let pid = child.id();
            assert!(alive(pid), "{name}");
            let started = Instant::now();
            stop(&mut child, grace);
            assert!(!alive(pid), "{name}");
            assert_eq!(started.elapsed() >= grace, waits, "{name}");
        }
    }

    #[test]
    fn no_such_pid_is_neither_signalled_nor_alive() {
        // Above the largest pid Linux hands out (pid_max ≤ 2^22).
        let pid = 1 << 23;
        assert!(!signal(pid, 0));
        assert!(!alive(pid));
        assert!(!signal(u32::MAX, 0), "out of pid_t range");
    }
}
