//! Message-flag wrappers: another message, sent with its netlink header's flags changed.

use mnl::mnl_sys::libc as mlibc;
use nftnl::nftnl_sys::libc;
use nftnl::{MsgType, NlMsg};
use std::ffi::c_void;

/// Sends `T`'s add message with `NLM_F_CREATE | NLM_F_EXCL`: fails with EEXIST, failing the
/// whole batch, if the object already exists.
pub(crate) struct Exclusive<'a, T>(pub &'a T);

// SAFETY: writes exactly `T`'s message (within bounds by `T`'s own NlMsg contract) and then
// changes only flag bits in its header: the same length.
unsafe impl<T: NlMsg> NlMsg for Exclusive<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: `buf` meets NlMsg::write's contract, passed on to `T`. `T` wrote its header at
        // the start of `buf`, which is aligned for nlmsghdr: libnftnl's batch pages are
        // malloc'd and every message length is NLMSG_ALIGNed (and a MsgBuf is u64-aligned).
        unsafe {
            self.0.write(buf, seq, msg_type);
            let h = buf.cast::<mlibc::nlmsghdr>();
            (*h).nlmsg_flags |= (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        }
    }
}

/// Sends `T`'s message without `NLM_F_ACK`. The kernel still answers a refused message (it
/// reports errors whatever the flags), so a batch acks only its last message: one reply and one
/// `recvmsg` per batch on success instead of one per message.
pub(crate) struct NoAck<'a, T>(pub &'a T);

// SAFETY: as for `Exclusive`: `T`'s message, only flag bits changed.
unsafe impl<T: NlMsg> NlMsg for NoAck<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: as for `Exclusive`: `T` wrote its header at the start of `buf`, aligned.
        unsafe {
            self.0.write(buf, seq, msg_type);
            let h = buf.cast::<mlibc::nlmsghdr>();
            (*h).nlmsg_flags &= !(libc::NLM_F_ACK as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    //! No kernel here: messages are written to a buffer and their headers read back.
    use super::*;
    use crate::ffi::dump::header;
    use crate::ffi::netlink::MsgBuf;
    use nftnl::{ProtoFamily, Table};

    #[test]
    fn exclusive_adds_create_and_excl() {
        let t = Table::new(c"t", ProtoFamily::Inet);
        let mut buf = MsgBuf::new();
        let h = header(buf.write(&Exclusive(&t), 1, MsgType::Add)).unwrap();
        assert_eq!(h.nlmsg_type & 0xff, libc::NFT_MSG_NEWTABLE as u16);
        let want = (libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK) as u16;
        assert_eq!(h.nlmsg_flags & want, want);
    }

    #[test]
    fn no_ack_clears_only_the_ack_flag() {
        let t = Table::new(c"t", ProtoFamily::Inet);
        let mut buf = MsgBuf::new();
        let plain = header(buf.write(&t, 1, MsgType::Add)).unwrap();
        let quiet = header(buf.write(&NoAck(&Exclusive(&t)), 1, MsgType::Add)).unwrap();
        assert_ne!(plain.nlmsg_flags & libc::NLM_F_ACK as u16, 0);
        assert_eq!(quiet.nlmsg_flags & libc::NLM_F_ACK as u16, 0);
        let excl = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        assert_eq!(quiet.nlmsg_flags & excl, excl);
    }
}
