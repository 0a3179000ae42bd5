//! Netlink plumbing shared by the netfilter [`Socket`](super::Socket) and `route.rs`'s
//! rtnetlink client: the message buffer, and the socket options and descriptor calls libmnl
//! does not wrap.
//!
//! Every helper takes the `mnl::Socket` itself, not a raw descriptor: a borrowed socket keeps
//! its descriptor open for the whole call.

use nftnl::nftnl_sys::libc;
use nftnl::{MsgType, NlMsg};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;

/// A buffer aligned for `nlmsghdr`, at least `nft_nlmsg_maxsize()` bytes long.
pub(crate) struct MsgBuf(Vec<u64>);

/// The buffer's size: at least one message of the largest size libnftnl builds, and at least
/// glibc's default mmap threshold (128 KiB), so that the zeroed allocation comes from fresh
/// anonymous pages that are touched only where a reply is written. A smaller buffer comes from
/// the heap and is zeroed by `calloc`, a page fault per 4 KiB: 17 faults per buffer, about a
/// third of the plugin's own, in every exec.
fn buf_len() -> usize {
    (nftnl::nft_nlmsg_maxsize() as usize).max(128 << 10)
}

impl MsgBuf {
    pub fn new() -> MsgBuf {
        MsgBuf(vec![0u64; buf_len().div_ceil(8)])
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        let len = self.0.len() * 8;
        // SAFETY: a u64 buffer viewed as bytes: same allocation, length in bytes, u8 has no
        // alignment or validity requirements; the `&mut self` borrow makes it the only view.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }

    /// The start of the buffer, for libnftnl's builders and [`NlMsg::write`]: room for
    /// `nft_nlmsg_maxsize()` bytes, aligned for `nlmsghdr`.
    pub(super) fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }

    /// Writes `msg` at the start of the buffer and returns it: the bytes its header counts
    /// (never more than the buffer).
    pub(super) fn write(&mut self, msg: &impl NlMsg, seq: u32, ty: MsgType) -> &[u8] {
        // SAFETY: NlMsg::write's contract: the buffer has room for nft_nlmsg_maxsize() bytes.
        unsafe { msg.write(self.ptr(), seq, ty) };
        let bytes = self.bytes();
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        &bytes[..len.min(bytes.len())]
    }
}

impl Default for MsgBuf {
    fn default() -> Self {
        MsgBuf::new()
    }
}

/// Sets an `int` socket option; the kernel's answer (0 or -1) is returned, not interpreted.
fn setsockopt_int(
    sock: &mnl::Socket,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> libc::c_int {
    // SAFETY: `sock` is a live socket, so its descriptor is open for the call; the option value
    // is an int on our stack, of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

/// A kernel that never answers must not hang the runtime: after `secs`, recv fails (EAGAIN).
pub(crate) fn set_recv_timeout(sock: &mnl::Socket, secs: i64) {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: `sock` is a live socket, so its descriptor is open for the call; a timeval on our
    // stack, of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// `NETLINK_CAP_ACK`: error replies then carry only the header of the refused message, not its
/// payload (up to 64 KiB per set-element message). Best effort: older kernels lack it.
pub(crate) fn cap_ack(sock: &mnl::Socket) {
    setsockopt_int(sock, SOL_NETLINK, NETLINK_CAP_ACK, 1);
}

/// Raises the socket's send buffer to hold `len` bytes (SO_SNDBUFFORCE: we are root; plain
/// SO_SNDBUF, capped by wmem_max, if that is refused).
pub(crate) fn grow_sndbuf(sock: &mnl::Socket, len: usize) {
    let want = libc::c_int::try_from(len + 4096).unwrap_or(libc::c_int::MAX);
    let mut cur: libc::c_int = 0;
    let mut sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is a live socket, so its descriptor is open for the call; `cur` and `sz`
    // are on our stack, `sz` holding `cur`'s size, as getsockopt requires.
    unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut cur as *mut libc::c_int).cast(),
            &mut sz,
        );
    }
    // The kernel doubles the value it is given and reports the doubled value.
    if cur / 2 < want && setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want) != 0 {
        setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, want);
    }
}

/// Raises the socket's receive buffer to `len` bytes if it is smaller (SO_RCVBUFFORCE).
pub(crate) fn grow_rcvbuf(sock: &mnl::Socket, len: usize) {
    let want = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
    if want <= 212_992 {
        return; // the default rmem_default holds that
    }
    setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want);
}

/// Whether a reply is queued on the socket right now (poll with no wait).
pub(crate) fn readable_now(sock: &mnl::Socket) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on our stack, count 1, timeout 0; its descriptor is `sock`'s, open
    // while `sock` is borrowed.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r > 0)
}

/// A second descriptor of the socket (close-on-exec): the socket is released only when both
/// are closed.
pub(crate) fn dup_fd(sock: &mnl::Socket) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor open while `sock` is borrowed; F_DUPFD_CLOEXEC takes an int
    // argument and returns a new descriptor or -1.
    let fd = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by F_DUPFD_CLOEXEC and nothing else owns it, so the
    // OwnedFd may close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
