//! Named sets with flags and our key types, and their elements: the NEWSET message
//! ([`NamedSet`]) and the NEWSETELEM messages ([`SetElems`]) that fill it, a bounded chunk at a
//! time.

use super::alloc;
use super::owned::{OwnedSet, UdataBuf};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, NlMsg, Table};
use std::ffi::{CStr, c_char, c_void};

const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

/// Key types of our sets (nft's datatype ids and lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Ipv4Addr,
    Ipv6Addr,
    InetService,
    Ifname,
}

impl KeyType {
    pub fn type_id(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 7,
            KeyType::Ipv6Addr => 8,
            KeyType::InetService => 13,
            KeyType::Ifname => 41,
        }
    }

    pub fn key_len(self) -> u32 {
        match self {
            KeyType::Ipv4Addr => 4,
            KeyType::Ipv6Addr => 16,
            KeyType::InetService => 2,
            KeyType::Ifname => 16,
        }
    }
}

/// One set element as netlink carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Elem {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`: this key closes an interval (exclusive end).
    pub interval_end: bool,
}

/// Elements per NEWSETELEM message: well inside one message's 64 KiB (an IPv6 interval
/// element takes about 40 bytes), and few enough that only one chunk of libnftnl element
/// objects (a few hundred bytes each) is alive at a time, whatever the set's size.
const ELEMS_PER_MESSAGE: usize = 512;

/// How many element messages [`SetElems::chunks`] makes of `n` elements.
pub(crate) fn elem_chunks(n: usize) -> usize {
    n.div_ceil(ELEMS_PER_MESSAGE)
}

/// A new libnftnl set object naming `name` in `table` (the fields every set message carries).
fn set_object(table: &Table, name: &CStr, id: u32) -> OwnedSet {
    let set = OwnedSet::new();
    let s = set.as_ptr();
    // SAFETY: `s` is a live nftnl_set; the strings are NUL-terminated and libnftnl copies them.
    unsafe {
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, table.get_family() as u32);
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.get_name().as_ptr());
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
    }
    set
}

/// The set's user data as nft writes it: the key's byte order, which nft reads to print
/// elements (the kernel ignores it). libnftnl copies the buffer's bytes into the set.
fn set_key_byteorder(set: &OwnedSet, key: KeyType) {
    let ud = UdataBuf::new(64);
    let order = if key == KeyType::Ifname {
        BYTEORDER_HOST
    } else {
        BYTEORDER_BIG
    };
    // SAFETY: `ud` is a live 64-byte buffer and one u32 TLV fits; `set` is a live nftnl_set,
    // and nftnl_set_set_data copies `len` bytes from the buffer's data, which lives until the
    // end of this function.
    unsafe {
        sys::nftnl_udata_put_u32(ud.as_ptr(), NFTNL_UDATA_SET_KEYBYTEORDER, order);
        sys::nftnl_set_set_data(
            set.as_ptr(),
            sys::NFTNL_SET_USERDATA as u16,
            sys::nftnl_udata_buf_data(ud.as_ptr()),
            sys::nftnl_udata_buf_len(ud.as_ptr()),
        );
    }
}

/// A named set (with `NFT_SET_INTERVAL` for address ranges): the NEWSET message. Its elements
/// go in [`SetElems`] messages.
pub(crate) struct NamedSet<'a> {
    set: OwnedSet,
    table: &'a Table,
}

impl<'a> NamedSet<'a> {
    pub fn new(table: &'a Table, name: &CStr, id: u32, key: KeyType, interval: bool) -> Self {
        let set = set_object(table, name, id);
        let flags = if interval {
            libc::NFT_SET_INTERVAL as u32
        } else {
            0
        };
        let s = set.as_ptr();
        // SAFETY: `s` is a live nftnl_set; u32 attributes of a set.
        unsafe {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, key.type_id());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, key.key_len());
        }
        set_key_byteorder(&set, key);
        NamedSet { set, table }
    }
}

// SAFETY: `write` builds one NEWSET message: a header and one set's attributes (names, a few
// u32s, a few bytes of user data), far below nft_nlmsg_maxsize(), the room NlMsg's caller gives.
unsafe impl NlMsg for NamedSet<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let ty = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWSET,
            MsgType::Del => libc::NFT_MSG_DELSET,
        };
        // SAFETY: `buf` has nft_nlmsg_maxsize() bytes (NlMsg::write's contract), which holds the
        // message; the set is live.
        unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                ty as u16,
                self.table.get_family() as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(h, self.set.as_ptr());
        }
    }
}

/// One NEWSETELEM message: a chunk of a set's elements.
pub(crate) struct SetElems<'a> {
    set: OwnedSet,
    table: &'a Table,
}

impl<'a> SetElems<'a> {
    /// The messages carrying `elems` into set `name` (`id`: its id in this transaction), one
    /// chunk at a time: build one, add it to the batch, drop it, build the next.
    pub fn chunks<'e>(
        table: &'a Table,
        name: &'e CStr,
        id: u32,
        elems: &'e [Elem],
    ) -> impl Iterator<Item = SetElems<'a>> + 'e
    where
        'a: 'e,
    {
        elems.chunks(ELEMS_PER_MESSAGE).map(move |chunk| {
            let set = set_object(table, name, id);
            for elem in chunk {
                // Keys are at most 16 bytes (IPv6, ifname): never hand libnftnl more.
                let len = elem.key.len().min(16);
                // SAFETY: the element is allocated here (`alloc` aborts on NULL) and owned by
                // the live set once added, which frees it; libnftnl copies the key's `len`
                // bytes, all within `elem.key`.
                unsafe {
                    let e = alloc(sys::nftnl_set_elem_alloc()).as_ptr();
                    sys::nftnl_set_elem_set(
                        e,
                        sys::NFTNL_SET_ELEM_KEY as u16,
                        elem.key.as_ptr().cast(),
                        len as u32,
                    );
                    if elem.interval_end {
                        sys::nftnl_set_elem_set_u32(
                            e,
                            sys::NFTNL_SET_ELEM_FLAGS as u16,
                            libc::NFT_SET_ELEM_INTERVAL_END as u32,
                        );
                    }
                    sys::nftnl_set_elem_add(set.as_ptr(), e);
                }
            }
            SetElems { set, table }
        })
    }
}

// SAFETY: `write` builds one NEWSETELEM message of at most ELEMS_PER_MESSAGE elements of at
// most 16-byte keys (about 40 bytes each on the wire): about 20 KiB, inside the
// nft_nlmsg_maxsize() bytes NlMsg's caller gives.
unsafe impl NlMsg for SetElems<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: `buf` holds nft_nlmsg_maxsize() bytes (NlMsg::write's contract) and a chunk is
        // a fraction of one message; the set is live.
        unsafe {
            let h = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                libc::NFT_MSG_NEWSETELEM as u16,
                self.table.get_family() as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(h, self.set.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    //! No kernel here: messages are built and read back the way the kernel would read them.
    use super::*;
    use crate::ffi::dump::header;
    use crate::ffi::netlink::MsgBuf;
    use nftnl::ProtoFamily;

    #[test]
    fn set_elements_come_in_bounded_messages() {
        let t = Table::new(c"t", ProtoFamily::Inet);
        let elems: Vec<Elem> = (0..1300u32)
            .map(|i| Elem {
                key: [0u8; 12].iter().copied().chain(i.to_be_bytes()).collect(),
                interval_end: i % 2 == 1,
            })
            .collect();
        let msgs: Vec<SetElems> = SetElems::chunks(&t, c"s", 1, &elems).collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(elem_chunks(elems.len()), 3);
        for m in &msgs {
            let mut buf = MsgBuf::new();
            let h = header(buf.write(m, 7, MsgType::Add)).unwrap();
            assert_eq!(h.nlmsg_type & 0xff, libc::NFT_MSG_NEWSETELEM as u16);
            assert!(h.nlmsg_len < 60_000, "{} bytes", h.nlmsg_len);
        }
    }

    #[test]
    fn key_types_match_nft() {
        for (k, ty, len) in [
            (KeyType::Ipv4Addr, 7, 4),
            (KeyType::Ipv6Addr, 8, 16),
            (KeyType::InetService, 13, 2),
            (KeyType::Ifname, 41, 16),
        ] {
            assert_eq!((k.type_id(), k.key_len()), (ty, len));
        }
    }
}
