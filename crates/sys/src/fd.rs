//! File descriptors between processes: socket pairs, `SCM_RIGHTS`, and putting descriptors at
//! fixed numbers in a child.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Most descriptors one message may carry, either way.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `bytes` with `fds` attached to the first byte, in one `sendmsg`. Returns how many bytes
/// went (possibly fewer than `bytes`; the descriptors went with the first of them). Never raises
/// SIGPIPE: a closed peer is `EPIPE`.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message; the limit is {MAX_FDS_PER_MESSAGE}",
                fds.len()
            ),
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "no room for the descriptors in the control buffer",
        ));
    }
    Ok(rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Receives bytes into `buf`, and the descriptors that came with them into `fds`, already
/// close-on-exec. A message whose descriptors did not all fit is an error (the ones that did
/// arrive are closed); so is more than [`MAX_FDS_PER_MESSAGE`] of them.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let message = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut received = Vec::new();
    for ancillary in control.drain() {
        if let RecvAncillaryMessage::ScmRights(incoming) = ancillary {
            received.extend(incoming);
        }
    }
    if message.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the peer sent more descriptors than the {MAX_FDS_PER_MESSAGE} a message may carry"
            ),
        ));
    }
    fds.extend(received);
    Ok(message.bytes)
}

/// Takes ownership of descriptor `raw`, inherited from the parent (socket activation, the
/// channel to the master), after checking that it is open; marks it close-on-exec so the
/// program's own children do not inherit it.
///
/// The caller must take each number at most once and must not use it otherwise: the returned
/// [`OwnedFd`] closes it when dropped. `corral-worker` guards this with a once-only cell.
pub fn take_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is stdin, stdout or stderr"),
        ));
    }
    // SAFETY: `fcntl(F_GETFD)` only reads the descriptor's flags; it fails with EBADF, harming
    // nothing, when the number is not open.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the number is open (checked above), and by this function's contract nothing else
    // in the process owns it, so the `OwnedFd` may close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// Whether `fd` is a Unix-domain socket (otherwise, for a listener, TCP or UDP over IP).
pub fn is_unix_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(rustix::net::getsockname(fd)?.address_family() == AddressFamily::UNIX)
}

/// Makes `fd` blocking or not.
pub fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, nonblocking)?)
}

/// Arranges for the child of `command` to find each descriptor of `fds` at its target number
/// (3 and up), inherited across exec; the caller keeps its own descriptors.
///
/// Copies are made now, at numbers above every target, so that placing one never overwrites
/// another not yet placed; the child moves them with `dup2` (async-signal-safe) and its exec
/// closes the copies. The parent's copies close when `command` is dropped.
pub fn place_fds(
    command: &mut std::process::Command,
    fds: &[(BorrowedFd<'_>, RawFd)],
) -> io::Result<()> {
    let Some(top) = fds.iter().map(|&(_, target)| target).max() else {
        return Ok(());
    };
    if fds.iter().any(|&(_, target)| target < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors 0 to 2 are stdin, stdout and stderr",
        ));
    }
    let copies: Vec<(OwnedFd, RawFd)> = fds
        .iter()
        .map(|&(fd, target)| {
            Ok((
                rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), top + 1)?,
                target,
            ))
        })
        .collect::<io::Result<_>>()?;
    // SAFETY: the closure runs in the child between fork and exec. It calls only `dup2`, which is
    // async-signal-safe, and does not allocate: `copies` was built before the fork. `dup2` clears
    // close-on-exec on the new number, so the target survives exec while the copy does not.
    unsafe {
        command.pre_exec(move || {
            for (copy, target) in &copies {
                if libc::dup2(copy.as_raw_fd(), *target) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Waits until the socket `fd` has room for writing, or, when `or_readable`, something to read;
/// whether it has something to read.
pub fn wait_room_or_readable(fd: BorrowedFd<'_>, or_readable: bool) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    let flags = if or_readable {
        PollFlags::OUT | PollFlags::IN
    } else {
        PollFlags::OUT
    };
    let mut polled = [PollFd::new(&fd, flags)];
    loop {
        match rustix::event::poll(&mut polled, None) {
            Ok(_) => return Ok(polled[0].revents().contains(PollFlags::IN)),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Registers `fd` (non-blocking) with the current tokio runtime, to wait for it to be readable
/// or writable; on failure, gives it back with the error. Must be called within a runtime.
#[cfg(feature = "tokio")]
pub fn watch(fd: OwnedFd) -> Result<tokio::io::unix::AsyncFd<OwnedFd>, (OwnedFd, io::Error)> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and keeps its number, until it
    // is dropped, which only the `AsyncFd` (its owner from here on) can do.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(tokio::io::unix::AsyncFdRegisterError::into_parts)
}

/// Waits until one of `fds` is readable (for a listener: has a connection), at most `timeout`.
/// The index of one readable descriptor, or `None` when the time ran out.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Option<usize>> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let timeout = Timespec::try_from(timeout).map_err(io::Error::other)?;
    match rustix::event::poll(&mut polled, Some(&timeout)) {
        Ok(0) | Err(rustix::io::Errno::INTR) => Ok(None),
        Ok(_) => Ok(polled.iter().position(|p| !p.revents().is_empty())),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_a_descriptor_that_arrives_close_on_exec() {
        let (a, b) = stream_pair().unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"hello", &[x.as_fd()]).unwrap(), 5);
        drop(x);
        let mut buf = [0; 16];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // The received descriptor is the same socket: what goes in at y comes out of it.
        let mut received = UnixStream::from(fds.pop().unwrap());
        (&y).write_all(b"ping").unwrap();
        let mut got = [0; 4];
        received.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn refuses_too_many_descriptors() {
        let (a, _b) = stream_pair().unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS_PER_MESSAGE).map(|_| a.as_fd()).collect();
        assert!(send_with_fds(a.as_fd(), b"x", &fds).is_err());
    }

    #[test]
    fn a_child_finds_descriptors_at_their_numbers() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut command = std::process::Command::new("bash");
        // Writes into fd 5 (the socket) and reports whether fd 4 is open (it must not be).
        command.args([
            "-c",
            "echo placed >&5; [ -e /proc/self/fd/4 ] && echo leak >&5; exit 0",
        ]);
        place_fds(&mut command, &[(theirs.as_fd(), 5)]).unwrap();
        let status = command.status().unwrap();
        assert!(status.success());
        drop(command);
        drop(theirs);
        let mut text = String::new();
        (&ours).read_to_string(&mut text).unwrap();
        assert_eq!(text, "placed\n");
    }
}
