//! The syscalls corral needs, as safe functions. Every `unsafe` block of the workspace is in this
//! crate (the other crates forbid `unsafe_code`), each with a `// SAFETY:` comment
//! (`grep -n unsafe crates/sys/src` lists them all).
//!
//! It owns process groups and sessions, signals, locks and process accounting reads; it knows
//! nothing of apps or of the daemon.

#![warn(missing_docs)]

pub mod fd;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;

use rustix::process::{Pid, Signal};

/// Makes the command's child the leader of a new session (and process group), detached from the
/// caller's terminal: how the CLI starts the daemon in the background.
pub fn start_new_session(command: &mut std::process::Command) {
    // SAFETY: the closure runs between fork and exec in the child, where only async-signal-safe
    // calls are allowed; it makes exactly one raw `setsid` syscall and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
}

fn pid(raw: u32) -> io::Result<Pid> {
    i32::try_from(raw)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {raw}")))
}

fn signal(number: i32) -> io::Result<Signal> {
    Signal::from_named_raw(number)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad signal {number}")))
}

/// Sends signal `number` to the process `pid`.
pub fn kill(pid_: u32, number: i32) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(pid_)?, signal(number)?)?)
}

/// Sends signal `number` to every process of the process group `pgid`.
pub fn kill_group(pgid: u32, number: i32) -> io::Result<()> {
    Ok(rustix::process::kill_process_group(
        pid(pgid)?,
        signal(number)?,
    )?)
}

/// Whether any process (zombies included) is left in the process group `pgid`.
pub fn group_exists(pgid: u32) -> bool {
    let Ok(pgid) = pid(pgid) else { return false };
    match rustix::process::test_kill_process_group(pgid) {
        Ok(()) => true,
        // EPERM: a process is there, owned by someone else.
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// How a child ended, as `waitpid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It called `exit` with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Reaps one child that has ended, of any pid, without waiting: `Ok(None)` when no child has
/// ended (or there is no child at all).
pub fn reap_any() -> io::Result<Option<(u32, ExitKind)>> {
    // `wait`, not `waitpid(None, ..)`: rustix's `None` there means pid 0, "my process group".
    match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
        Ok(Some((pid, status))) => {
            let kind = match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => ExitKind::Code(code),
                (None, Some(signal)) => ExitKind::Signal(signal),
                // Stopped or continued children are not reported without WUNTRACED/WCONTINUED.
                (None, None) => ExitKind::Code(-1),
            };
            Ok(Some((pid.as_raw_nonzero().get() as u32, kind)))
        }
        Ok(None) => Ok(None),
        Err(e) if e == rustix::io::Errno::CHILD => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Makes this process the reaper of its orphaned descendants: a grandchild whose parent dies is
/// re-parented here instead of to init, so that its exit is reaped by [`reap_any`] here.
pub fn become_child_subreaper() -> io::Result<()> {
    Ok(rustix::process::set_child_subreaper(Some(
        rustix::process::getpid(),
    ))?)
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Takes an exclusive advisory lock on `file` without waiting; `Ok(false)` when another process
/// holds it. The lock lasts as long as the file stays open.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(
        file.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Clock ticks per second, the unit of CPU times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// Size of a memory page, the unit of `/proc/<pid>/statm`.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_a_process_group_and_sees_it_go() {
        let mut command = std::process::Command::new("sleep");
        command.arg("30").process_group(0);
        let mut child = command.spawn().unwrap();
        let pgid = child.id();
        assert!(group_exists(pgid));
        kill_group(pgid, 9).unwrap();
        child.wait().unwrap();
        assert!(!group_exists(pgid));
    }

    #[test]
    fn a_second_lock_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = File::create(&path).unwrap();
        let second = File::open(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        assert!(!try_lock_exclusive(&second).unwrap());
        // Not asserted: that closing `first` frees the lock at once. A child forked by another
        // test thread holds a copy of the descriptor until its exec, and with it the lock.
    }

    #[test]
    fn rejects_bad_numbers() {
        assert!(kill(0, 15).is_err());
        assert!(kill(u32::MAX, 15).is_err());
        assert!(kill_group(1, 999).is_err());
    }
}
