//! The netfilter netlink socket: sends a batch in one `sendmsg` and collects the kernel's
//! replies, and runs the GET requests and dumps that read the kernel's objects back.

use super::dump::{
    ChainInfo, Dumpable, RuleInfo, SetInfo, header, parse_ack, parse_elems, parse_table_flags,
};
use super::netlink::{self, MsgBuf};
use super::owned::{OwnedSet, OwnedTable};
use super::sets::Elem;
use mnl::mnl_sys::libc as mlibc;
use nftnl::nftnl_sys::{self as sys, libc};
use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;

/// A netfilter netlink socket of the network namespace it was opened in.
pub(crate) struct Socket {
    sock: mnl::Socket,
    buf: MsgBuf,
    seq: u32,
}

/// An error reply to one message of a batch.
#[derive(Debug)]
pub(crate) struct BatchError {
    pub seq: u32,
    pub err: io::Error,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter)?;
        netlink::cap_ack(&sock);
        netlink::set_recv_timeout(&sock, 10);
        Ok(Socket {
            sock,
            buf: MsgBuf::new(),
            seq: 1 << 20,
        })
    }

    /// A second descriptor of this socket (close-on-exec): the socket is released only when
    /// both are closed.
    pub fn dup_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        netlink::dup_fd(&self.sock)
    }

    /// Sends a finalized batch and waits for the reply to message `last` (the one message sent
    /// with `NLM_F_ACK`; refused messages are answered whatever their flags).
    /// Returns the error replies (empty: the kernel committed the batch).
    pub fn send_batch(
        &mut self,
        batch: &nftnl::FinalizedBatch,
        last: u32,
    ) -> io::Result<Vec<BatchError>> {
        // The kernel takes a batch only from one sendmsg (a batch split over several sends loses
        // its begin marker after the first), so the batch's pages go as one message's iovecs,
        // with a send buffer big enough for them (large sets make batches of hundreds of KiB).
        let pages: Vec<std::io::IoSlice> = batch.iter().map(std::io::IoSlice::new).collect();
        let len: usize = pages.iter().map(|p| p.len()).sum();
        netlink::grow_sndbuf(&self.sock, len);
        // The replies arrive during the send (the kernel handles the batch in our sendmsg) and
        // must fit in the receive buffer, or the kernel drops them (ENOBUFS) and a committed
        // batch would look failed: room for an error reply per message, in case all fail.
        netlink::grow_rcvbuf(&self.sock, batch.sequence_numbers().len() * 1024);
        let sent = nix::sys::socket::sendmsg::<()>(
            self.sock.as_raw_fd(),
            &pages,
            &[],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent != len {
            return Err(io::Error::other("netlink sendmsg sent a partial batch"));
        }
        let mut pending = true;
        let mut errors = Vec::new();
        while pending {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                let Some((seq, errno)) = parse_ack(msg) else {
                    continue;
                };
                if seq == last {
                    pending = false;
                }
                if errno != 0 {
                    errors.push(BatchError {
                        seq,
                        err: io::Error::from_raw_os_error(errno),
                    });
                }
            }
            // After a refusal the rest of the replies matter little: keep reading only while
            // they are already queued, so a kernel that skips some cannot make us wait.
            if !errors.is_empty() && !netlink::readable_now(&self.sock)? {
                break;
            }
        }
        errors.sort_by_key(|e| e.seq);
        Ok(errors)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends a request built in a fresh buffer: the header (`msg_type` for `family`, `flags`,
    /// this request's sequence number), then what `payload` adds to it. Returns the sequence
    /// number.
    fn request(
        &mut self,
        msg_type: u32,
        family: u16,
        flags: libc::c_int,
        payload: impl FnOnce(*mut mlibc::nlmsghdr),
    ) -> io::Result<u32> {
        let seq = self.next_seq();
        let mut req = MsgBuf::new();
        // SAFETY: `req` has nft_nlmsg_maxsize() bytes, aligned, and a GET request is a header
        // and a few attributes; the header is written (and its length set) by
        // nftnl_nlmsg_build_hdr before we read it.
        let len = unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                req.ptr().cast(),
                msg_type as u16,
                family,
                flags as u16,
                seq,
            );
            payload(h.cast());
            (*h).nlmsg_len as usize
        };
        self.sock.send(&req.bytes()[..len])?;
        Ok(seq)
    }

    /// Runs a GET dump (`NLM_F_DUMP`) for `family` and collects what `each` extracts.
    fn dump<T>(
        &mut self,
        payload: impl FnOnce(*mut mlibc::nlmsghdr),
        msg_type: u32,
        family: u16,
        mut each: impl FnMut(&[u8]) -> Option<T>,
    ) -> io::Result<Vec<T>> {
        let seq = self.request(
            msg_type,
            family,
            libc::NLM_F_DUMP | libc::NLM_F_ACK,
            payload,
        )?;
        let mut out = Vec::new();
        let portid = self.sock.portid();
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            let mut done = false;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                let Some(hdr) = header(msg) else {
                    continue;
                };
                if hdr.nlmsg_seq != seq || hdr.nlmsg_pid != portid {
                    continue;
                }
                match hdr.nlmsg_type as libc::c_int {
                    libc::NLMSG_DONE => done = true,
                    libc::NLMSG_ERROR => {
                        let errno = parse_ack(msg).map_or(0, |(_, e)| e);
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        done = true;
                    }
                    _ => {
                        if let Some(t) = each(msg) {
                            out.push(t);
                        }
                    }
                }
            }
            if done {
                return Ok(out);
            }
        }
    }

    fn dump_objects<T: Dumpable>(&mut self, family: u16, table: &str) -> io::Result<Vec<T>> {
        self.dump(
            |_| {},
            T::GET,
            family,
            |msg| T::parse(msg).and_then(|(t, obj)| (t == table).then_some(obj)),
        )
    }

    pub fn chains(&mut self, family: u16, table: &str) -> io::Result<Vec<ChainInfo>> {
        self.dump_objects(family, table)
    }

    /// Every chain in the namespace, of every family and table: (table, chain).
    pub fn all_chains(&mut self) -> io::Result<Vec<(String, String)>> {
        self.dump(
            |_| {},
            ChainInfo::GET,
            libc::NFPROTO_UNSPEC as u16,
            |msg| ChainInfo::parse(msg).map(|(t, c)| (t, c.name)),
        )
    }

    pub fn sets(&mut self, family: u16, table: &str) -> io::Result<Vec<SetInfo>> {
        self.dump_objects(family, table)
    }

    pub fn rules(&mut self, family: u16, table: &str) -> io::Result<Vec<RuleInfo>> {
        self.dump_objects(family, table)
    }

    /// Whether `table` exists (GETTABLE for it; ENOENT = no).
    pub fn table_exists(&mut self, family: u16, table: &str) -> io::Result<bool> {
        Ok(self.table_flags(family, table)?.is_some())
    }

    /// The flags of `table` (`NFT_TABLE_F_DORMANT`, …) if it exists.
    pub fn table_flags(&mut self, family: u16, table: &str) -> io::Result<Option<u32>> {
        let name = CString::new(table).map_err(io::Error::other)?;
        let t = OwnedTable::new();
        // SAFETY: `t` is a live table; the name is NUL-terminated and libnftnl copies it.
        unsafe {
            sys::nftnl_table_set_str(t.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr())
        };
        let seq = self.request(
            libc::NFT_MSG_GETTABLE as u32,
            family,
            libc::NLM_F_ACK,
            // SAFETY: `h` is the request's header, in a buffer with room for the table's
            // attributes (see `request`); `t` is a live table.
            |h| unsafe { sys::nftnl_table_nlmsg_build_payload(h.cast(), t.as_ptr()) },
        )?;
        drop(t);
        let mut found = None;
        loop {
            let n = self.sock.recv_raw(self.buf.bytes())?;
            for msg in mnl::NlMessages::new(&self.buf.bytes()[..n]) {
                let msg = msg?;
                if header(msg).is_none_or(|h| h.nlmsg_seq != seq) {
                    continue;
                }
                match parse_ack(msg) {
                    Some((_, 0)) => return Ok(found),
                    Some((_, e)) if e == libc::ENOENT => return Ok(None),
                    Some((_, e)) => return Err(io::Error::from_raw_os_error(e)),
                    None => found = Some(parse_table_flags(msg)),
                }
            }
        }
    }

    /// The elements of set `name` in `table`.
    pub fn set_elems(&mut self, family: u16, table: &str, name: &str) -> io::Result<Vec<Elem>> {
        let tname = CString::new(table).map_err(io::Error::other)?;
        let sname = CString::new(name).map_err(io::Error::other)?;
        let s = OwnedSet::new();
        // SAFETY: `s` is a live set; the names are NUL-terminated and libnftnl copies them.
        unsafe {
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_TABLE as u16, tname.as_ptr());
            sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_NAME as u16, sname.as_ptr());
        }
        let mut elems = Vec::new();
        self.dump(
            // SAFETY: `h` is the request's header, in a buffer with room for the set's names
            // (see `request`); `s` is a live set with no elements.
            |h| unsafe { sys::nftnl_set_elems_nlmsg_build_payload(h.cast(), s.as_ptr()) },
            libc::NFT_MSG_GETSETELEM as u32,
            family,
            |msg| parse_elems(msg, &mut elems).then_some(()),
        )?;
        Ok(elems)
    }
}
