//! The proc connector's wire format: the (un)subscribe messages zbridge sends and the decoder
//! of the datagrams the kernel sends back.
//!
//! Wire layout (all fields in host byte order, from the kernel's uapi headers
//! `linux/netlink.h`, `linux/connector.h` and `linux/cn_proc.h`):
//!
//! ```text
//! nlmsghdr  (16): len u32, type u16, flags u16, seq u32, pid u32
//! cn_msg    (20): idx u32, val u32, seq u32, ack u32, len u16, flags u16
//! payload       : subscribe: op u32 (or struct proc_input {op u32, event_mask u32}, 6.6+)
//!                 event: struct proc_event {what u32, cpu u32, timestamp_ns u64, union ...}
//! ```

/// `CN_IDX_PROC` / `CN_VAL_PROC` (linux/connector.h): the proc connector's callback id, which
/// is also its multicast group.
pub const CN_IDX_PROC: u32 = 1;
pub const CN_VAL_PROC: u32 = 1;
/// `enum proc_cn_mcast_op`.
pub const PROC_CN_MCAST_LISTEN: u32 = 1;
pub const PROC_CN_MCAST_IGNORE: u32 = 2;
/// `enum proc_cn_event` values zbridge uses.
pub const PROC_EVENT_NONE: u32 = 0;
pub const PROC_EVENT_FORK: u32 = 0x0000_0001;
pub const PROC_EVENT_EXEC: u32 = 0x0000_0002;
pub const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// Event types the kernel defines that zbridge does not use (uid, gid, sid, ptrace, comm,
/// non-zero exit (mask only), coredump).
const PROC_EVENTS_KNOWN_UNUSED: [u32; 7] = [
    0x0000_0004,
    0x0000_0040,
    0x0000_0080,
    0x0000_0100,
    0x0000_0200,
    0x2000_0000,
    0x4000_0000,
];

/// `NLMSG_DONE`: the connector sends (and expects) its messages with this type.
const NLMSG_DONE: u16 = 3;
pub(super) const NLMSGHDR_LEN: usize = 16;
pub(super) const CN_MSG_LEN: usize = 20;
/// `what`, `cpu`, `timestamp_ns` of `struct proc_event`.
pub(super) const PROC_EVENT_HEADER_LEN: usize = 16;
/// The length of the subscribe message: nlmsghdr + cn_msg + the u32 op.
pub const SUBSCRIBE_LEN: usize = NLMSGHDR_LEN + CN_MSG_LEN + 4;

pub(super) fn put_headers(msg: &mut [u8], seq: u32, port: u32, payload_len: u16) {
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg[6..8].copy_from_slice(&0u16.to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    msg[12..16].copy_from_slice(&port.to_ne_bytes());
    msg[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg[20..24].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg[24..28].copy_from_slice(&seq.to_ne_bytes());
    // The kernel multicasts its ACK (cn ack = our ack + 1) to every listener: our port number
    // in the ack field tells our ACK from another subscriber's.
    msg[28..32].copy_from_slice(&port.to_ne_bytes());
    msg[32..34].copy_from_slice(&payload_len.to_ne_bytes());
    msg[34..36].copy_from_slice(&0u16.to_ne_bytes());
}

/// The 40-byte (un)subscribe message: nlmsghdr + cn_msg + `enum proc_cn_mcast_op`.
pub fn subscribe_message(op: u32, seq: u32, port: u32) -> [u8; SUBSCRIBE_LEN] {
    let mut msg = [0u8; SUBSCRIBE_LEN];
    put_headers(&mut msg, seq, port, 4);
    msg[36..40].copy_from_slice(&op.to_ne_bytes());
    msg
}

/// The 44-byte subscribe message with a `struct proc_input` (kernels 6.6 and later).
pub fn proc_input_message(op: u32, event_mask: u32, seq: u32, port: u32) -> [u8; 44] {
    let mut msg = [0u8; 44];
    put_headers(&mut msg, seq, port, 8);
    msg[36..40].copy_from_slice(&op.to_ne_bytes());
    msg[40..44].copy_from_slice(&event_mask.to_ne_bytes());
    msg
}

/// A process event as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    Fork {
        parent_pid: u32,
        parent_tgid: u32,
        child_pid: u32,
        child_tgid: u32,
    },
    Exec {
        pid: u32,
        tgid: u32,
    },
    /// `exit_code` is the kernel's `task->exit_code` (a wait status: code << 8 | signal).
    Exit {
        pid: u32,
        tgid: u32,
        exit_code: u32,
    },
}

/// One decoded netlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A fork, exec or exit, with the kernel's CLOCK_MONOTONIC timestamp.
    Event { ts_ns: u64, event: KernelEvent },
    /// The answer to a (un)subscribe: `err` is 0 or a positive errno.
    Ack { seq: u32, ack: u32, err: u32 },
    /// A proc event type the kernel defines but zbridge does not use (uid, gid, comm, ...).
    Unused { what: u32 },
    /// A proc event type this code does not know (a newer kernel).
    Unknown { what: u32 },
    /// A netlink message that is not a proc connector message (a control message, or another
    /// connector callback id).
    NotProc { nlmsg_type: u16 },
}

/// A datagram that cannot be decoded. The rest of the datagram is skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message at byte {offset}: {available} bytes left, a netlink header needs 16")]
    TruncatedHeader { offset: usize, available: usize },
    #[error(
        "message at byte {offset}: nlmsg_len {nlmsg_len} does not fit (minimum 16, {available} \
         bytes left)"
    )]
    BadLength {
        offset: usize,
        nlmsg_len: u32,
        available: usize,
    },
    #[error("message at byte {offset}: {what} needs {needed} bytes, the message has {available}")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: usize,
        available: usize,
    },
}

/// Decodes a datagram of one or more netlink messages. Never panics: a malformed message
/// yields one error and ends the iteration.
pub fn decode(buf: &[u8]) -> Messages<'_> {
    Messages { buf, offset: 0 }
}

/// The messages of a datagram, see [`decode`].
pub struct Messages<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl Iterator for Messages<'_> {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.offset..)?;
        if rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        match decode_one(rest, offset) {
            Ok((message, len)) => {
                // NLMSG_ALIGN: messages start at multiples of 4.
                self.offset = offset.saturating_add((len + 3) & !3);
                Some(Ok(message))
            }
            Err(e) => {
                self.offset = self.buf.len();
                Some(Err(e))
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(v)
}

/// Decodes the message at the start of `b`; returns it and its unaligned length.
fn decode_one(b: &[u8], offset: usize) -> Result<(Message, usize), DecodeError> {
    if b.len() < NLMSGHDR_LEN {
        return Err(DecodeError::TruncatedHeader {
            offset,
            available: b.len(),
        });
    }
    let nlmsg_len = u32_at(b, 0);
    let len = nlmsg_len as usize;
    if len < NLMSGHDR_LEN || len > b.len() {
        return Err(DecodeError::BadLength {
            offset,
            nlmsg_len,
            available: b.len(),
        });
    }
    let msg = &b[..len];
    let nlmsg_type = u16_at(msg, 4);
    if nlmsg_type != NLMSG_DONE {
        return Ok((Message::NotProc { nlmsg_type }, len));
    }
    let truncated = |what, needed| DecodeError::Truncated {
        offset,
        what,
        needed,
        available: len,
    };
    if len < NLMSGHDR_LEN + CN_MSG_LEN {
        return Err(truncated("a connector header", NLMSGHDR_LEN + CN_MSG_LEN));
    }
    let cn = &msg[NLMSGHDR_LEN..];
    if u32_at(cn, 0) != CN_IDX_PROC || u32_at(cn, 4) != CN_VAL_PROC {
        return Ok((Message::NotProc { nlmsg_type }, len));
    }
    let cn_seq = u32_at(cn, 8);
    let cn_ack = u32_at(cn, 12);
    let data_len = u16_at(cn, 16) as usize;
    let data_start = NLMSGHDR_LEN + CN_MSG_LEN;
    if data_start + data_len > len {
        return Err(truncated("the connector payload", data_start + data_len));
    }
    let data = &msg[data_start..data_start + data_len];
    let need = |n: usize, what| {
        if data.len() < n {
            Err(truncated(what, data_start + n))
        } else {
            Ok(())
        }
    };
    need(PROC_EVENT_HEADER_LEN, "a proc event header")?;
    let what = u32_at(data, 0);
    let ts_ns = u64_at(data, 8);
    let body = PROC_EVENT_HEADER_LEN;
    let message = match what {
        PROC_EVENT_NONE => {
            need(body + 4, "an ack")?;
            Message::Ack {
                seq: cn_seq,
                ack: cn_ack,
                err: u32_at(data, body),
            }
        }
        PROC_EVENT_FORK => {
            need(body + 16, "a fork event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Fork {
                    parent_pid: u32_at(data, body),
                    parent_tgid: u32_at(data, body + 4),
                    child_pid: u32_at(data, body + 8),
                    child_tgid: u32_at(data, body + 12),
                },
            }
        }
        PROC_EVENT_EXEC => {
            need(body + 8, "an exec event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Exec {
                    pid: u32_at(data, body),
                    tgid: u32_at(data, body + 4),
                },
            }
        }
        PROC_EVENT_EXIT => {
            need(body + 12, "an exit event")?;
            Message::Event {
                ts_ns,
                event: KernelEvent::Exit {
                    pid: u32_at(data, body),
                    tgid: u32_at(data, body + 4),
                    exit_code: u32_at(data, body + 8),
                },
            }
        }
        w if PROC_EVENTS_KNOWN_UNUSED.contains(&w) => Message::Unused { what: w },
        w => Message::Unknown { what: w },
    };
    Ok((message, len))
}

#[cfg(test)]
mod tests {
    use super::super::wire;
    use super::*;

    fn all(buf: &[u8]) -> Vec<Result<Message, DecodeError>> {
        decode(buf).collect()
    }

    #[test]
    fn subscribe_message_is_byte_exact() {
        let msg = subscribe_message(PROC_CN_MCAST_LISTEN, 7, 4242);
        let mut want = Vec::new();
        want.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
        want.extend_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
        want.extend_from_slice(&0u16.to_ne_bytes()); // flags
        want.extend_from_slice(&7u32.to_ne_bytes()); // seq
        want.extend_from_slice(&4242u32.to_ne_bytes()); // port
        want.extend_from_slice(&1u32.to_ne_bytes()); // CN_IDX_PROC
        want.extend_from_slice(&1u32.to_ne_bytes()); // CN_VAL_PROC
        want.extend_from_slice(&7u32.to_ne_bytes()); // cn seq
        want.extend_from_slice(&4242u32.to_ne_bytes()); // cn ack: our port, echoed + 1
        want.extend_from_slice(&4u16.to_ne_bytes()); // cn len
        want.extend_from_slice(&0u16.to_ne_bytes()); // cn flags
        want.extend_from_slice(&1u32.to_ne_bytes()); // PROC_CN_MCAST_LISTEN
        assert_eq!(msg.len(), 40);
        assert_eq!(msg.to_vec(), want);
    }

    #[test]
    fn proc_input_message_carries_the_mask() {
        let msg = proc_input_message(PROC_CN_MCAST_LISTEN, 0x8000_0003, 2, 9);
        assert_eq!(u32_at(&msg, 0), 44);
        assert_eq!(u16_at(&msg, 32), 8);
        assert_eq!(u32_at(&msg, 36), 1);
        assert_eq!(u32_at(&msg, 40), 0x8000_0003);
    }

    #[test]
    fn decodes_fork() {
        let msg = wire::fork(123, 10, 10, 11, 11);
        assert_eq!(msg.len(), 16 + 20 + 40);
        assert_eq!(
            all(&msg),
            vec![Ok(Message::Event {
                ts_ns: 123,
                event: KernelEvent::Fork {
                    parent_pid: 10,
                    parent_tgid: 10,
                    child_pid: 11,
                    child_tgid: 11
                }
            })]
        );
    }

    #[test]
    fn decodes_exec() {
        assert_eq!(
            all(&wire::exec(5, 77, 76)),
            vec![Ok(Message::Event {
                ts_ns: 5,
                event: KernelEvent::Exec { pid: 77, tgid: 76 }
            })]
        );
    }

    #[test]
    fn decodes_exit() {
        assert_eq!(
            all(&wire::exit(9, 78, 76, 256)),
            vec![Ok(Message::Event {
                ts_ns: 9,
                event: KernelEvent::Exit {
                    pid: 78,
                    tgid: 76,
                    exit_code: 256
                }
            })]
        );
    }

    #[test]
    fn decodes_ack() {
        let mut msg = wire::event_message(PROC_EVENT_NONE, 0, &[1]);
        msg[24..28].copy_from_slice(&5u32.to_ne_bytes()); // cn seq
        msg[28..32].copy_from_slice(&1u32.to_ne_bytes()); // cn ack
        assert_eq!(
            all(&msg),
            vec![Ok(Message::Ack {
                seq: 5,
                ack: 1,
                err: 1
            })]
        );
    }

    #[test]
    fn decodes_two_messages_in_one_datagram() {
        let mut datagram = wire::exec(1, 100, 100);
        datagram.extend_from_slice(&wire::exit(2, 100, 100, 0));
        assert_eq!(
            all(&datagram),
            vec![
                Ok(Message::Event {
                    ts_ns: 1,
                    event: KernelEvent::Exec {
                        pid: 100,
                        tgid: 100
                    }
                }),
                Ok(Message::Event {
                    ts_ns: 2,
                    event: KernelEvent::Exit {
                        pid: 100,
                        tgid: 100,
                        exit_code: 0
                    }
                }),
            ]
        );
    }

    #[test]
    fn unaligned_message_is_followed_at_the_aligned_offset() {
        // An exec whose payload is 2 bytes longer than needed: nlmsg_len 78, next at 80.
        let mut first = wire::exec(1, 1, 1);
        first.extend_from_slice(&[0xaa, 0xbb]);
        let total = first.len() as u32;
        first[0..4].copy_from_slice(&total.to_ne_bytes());
        first[32..34].copy_from_slice(&42u16.to_ne_bytes());
        first.extend_from_slice(&[0, 0]); // padding to 4
        first.extend_from_slice(&wire::exec(2, 2, 2));
        let got = all(&first);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Ok(Message::Event {
                ts_ns: 2,
                event: KernelEvent::Exec { pid: 2, tgid: 2 }
            })
        );
    }

    #[test]
    fn unknown_and_unused_types_are_reported_not_decoded() {
        let mut datagram = wire::event_message(0x0100_0000, 1, &[]);
        datagram.extend_from_slice(&wire::event_message(0x200, 1, &[])); // PROC_EVENT_COMM
        assert_eq!(
            all(&datagram),
            vec![
                Ok(Message::Unknown { what: 0x0100_0000 }),
                Ok(Message::Unused { what: 0x200 })
            ]
        );
    }

    #[test]
    fn other_connector_ids_and_control_messages_are_not_proc() {
        let mut other = wire::exec(1, 1, 1);
        other[16..20].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(all(&other), vec![Ok(Message::NotProc { nlmsg_type: 3 })]);
        let mut noop = wire::exec(1, 1, 1);
        noop[4..6].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(all(&noop), vec![Ok(Message::NotProc { nlmsg_type: 1 })]);
    }

    #[test]
    fn truncated_datagrams_are_errors() {
        let msg = wire::exit(1, 1, 1, 0);
        // Cut inside the netlink header.
        assert_eq!(
            all(&msg[..10]),
            vec![Err(DecodeError::TruncatedHeader {
                offset: 0,
                available: 10
            })]
        );
        // Cut inside the event: nlmsg_len now claims more than the datagram holds.
        assert!(matches!(
            all(&msg[..50])[..],
            [Err(DecodeError::BadLength { nlmsg_len: 76, .. })]
        ));
        // A consistent nlmsg_len but a cn_msg.len too short for an exit event.
        let mut short = msg[..16 + 20 + 24].to_vec();
        short[0..4].copy_from_slice(&60u32.to_ne_bytes());
        short[32..34].copy_from_slice(&24u16.to_ne_bytes());
        assert!(matches!(
            all(&short)[..],
            [Err(DecodeError::Truncated {
                what: "an exit event",
                ..
            })]
        ));
        // A good message followed by a fragment: the good one, then an error.
        let mut two = wire::exec(1, 3, 3);
        two.extend_from_slice(&msg[..20]);
        let got = all(&two);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert!(matches!(got[1], Err(DecodeError::BadLength { .. })));
    }

    #[test]
    fn oversized_lengths_are_errors() {
        let mut msg = wire::exec(1, 1, 1);
        msg[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::BadLength { .. })]
        ));
        let mut msg = wire::exec(1, 1, 1);
        msg[32..34].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::Truncated {
                what: "the connector payload",
                ..
            })]
        ));
        let mut msg = wire::exec(1, 1, 1);
        msg[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(
            all(&msg)[..],
            [Err(DecodeError::BadLength { .. })]
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random sweep over lengths and contents.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&bytes).count();
            // Also with a plausible header, so decoding goes deeper.
            let mut framed = wire::exec(1, 1, 1);
            framed.truncate(36);
            framed.extend_from_slice(&bytes);
            let total = framed.len() as u32;
            framed[0..4].copy_from_slice(&total.to_ne_bytes());
            let _ = decode(&framed).count();
        }
    }
}
