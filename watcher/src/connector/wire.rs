//! Builders of kernel-shaped messages, for tests and benchmarks of the decoder.

use super::codec::{
    put_headers, CN_MSG_LEN, NLMSGHDR_LEN, PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK,
    PROC_EVENT_HEADER_LEN,
};

/// A proc event message as the kernel sends it (`struct proc_event` of 40 bytes).
pub fn event_message(what: u32, ts_ns: u64, body: &[u32]) -> Vec<u8> {
    let mut event = [0u8; 40];
    event[0..4].copy_from_slice(&what.to_ne_bytes());
    event[8..16].copy_from_slice(&ts_ns.to_ne_bytes());
    for (i, v) in body.iter().take(6).enumerate() {
        let at = PROC_EVENT_HEADER_LEN + 4 * i;
        event[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let mut msg = vec![0u8; NLMSGHDR_LEN + CN_MSG_LEN];
    put_headers(&mut msg, 0, 0, event.len() as u16);
    msg.extend_from_slice(&event);
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());
    msg
}

pub fn fork(
    ts_ns: u64,
    parent_pid: u32,
    parent_tgid: u32,
    child_pid: u32,
    child_tgid: u32,
) -> Vec<u8> {
    event_message(
        PROC_EVENT_FORK,
        ts_ns,
        &[parent_pid, parent_tgid, child_pid, child_tgid],
    )
}

pub fn exec(ts_ns: u64, pid: u32, tgid: u32) -> Vec<u8> {
    event_message(PROC_EVENT_EXEC, ts_ns, &[pid, tgid])
}

pub fn exit(ts_ns: u64, pid: u32, tgid: u32, exit_code: u32) -> Vec<u8> {
    event_message(PROC_EVENT_EXIT, ts_ns, &[pid, tgid, exit_code, 17, 1, 1])
}
