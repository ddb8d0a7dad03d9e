//! inpod-ztunnel: a fake ztunnel in `shared` (in-pod) mode, speaking ZDS to the node agent.
//!
//! `inpod-ztunnel` is ztunnel in `shared` mode as the node agent sees it over ZDS
//! (`istio.workload.zds`): it connects to the agent's SOCK_SEQPACKET socket (retrying about
//! 5 s until it exists), sends `ZdsHello{version}` (1 unless `--hello-version`), and answers
//! every `WorkloadRequest` with `WorkloadResponse{ack: Ack{error}}`. For an `add` (which must
//! come with exactly one descriptor, the pod's network namespace) it opens ztunnel's listeners
//! inside that namespace (TCP `[::]:15001`, `[::]:15006`, `[::]:15008`, TCP and UDP
//! `127.0.0.1:15053` and `[::1]:15053`, every socket marked 1337) and acks only once all are
//! bound; a `del` closes them before its ack. `--nack UID:N` answers the first N adds of UID
//! with the error `fake nack` and opens nothing; `--no-ack` never answers (a hung peer, which
//! still reports and opens listeners). A protocol violation (undecodable message, no payload,
//! a truncated message, an `add` without its descriptor, another message with one) is
//! reported on an `error` line and ends the process with status 3, dropping the connection
//! as ztunnel drops it. A second `add` of a UID the fake holds is answered as ztunnel's
//! statemanager answers it: in the same namespace (device and inode) it changes nothing, the
//! listeners stay open; in another namespace it replaces the pod (its listeners move to the
//! new one). `--pass-through`: 15001 and 15006 connect onward to the
//! original destination (or, unanswered, the socket's local address, as ztunnel falls back)
//! from the pod's namespace, marked 1337, 15006 bound to the client's address, and proxy;
//! a destination that is the listener itself on loopback is refused with errno 40 (ELOOP).
//! `--reconnect`: as ztunnel when its node agent restarts, the connection's end does not end
//! the process: the pods' listeners stay open, and the fake connects again (retrying about
//! 5 s) and sends its hello. Each session's snapshot is reconciled as ztunnel does: the pods
//! added or kept before its `snapshot_sent` stay, every other pod held is closed (`dropped`),
//! and a `keep` after `snapshot_sent` is a protocol violation.
//!
//! The protobuf of `istio.workload.zds` is encoded and decoded here by hand, independently of
//! the agent's prost code, so that a test of the agent checks its encoding against a second
//! implementation rather than against itself.

use super::*;

const AF_UNIX: i32 = 1;
const SOCK_SEQPACKET: i32 = 5;
const SO_RCVTIMEO: i32 = 20;
const SO_MARK: i32 = 36;
const SCM_RIGHTS: i32 = 1;
const MSG_CTRUNC: i32 = 0x8;
const MSG_TRUNC: i32 = 0x20;
const MSG_NOSIGNAL: i32 = 0x4000;
const MSG_CMSG_CLOEXEC: i32 = 0x4000_0000;
const CLONE_NEWNET: i32 = 0x4000_0000;
const SHUT_RDWR: i32 = 2;
const ENOENT: i32 = 2;
const EINTR: i32 = 4;
const EAGAIN: i32 = 11;
const EMFILE: i32 = 24;
const EPIPE: i32 = 32;
const ELOOP: i32 = 40;
const ECONNRESET: i32 = 104;
const ECONNREFUSED: i32 = 111;
/// ztunnel marks every socket it makes in a pod's namespace, so that istio-cni's rules (and
/// anything else looking at marks) let its own traffic through.
const ZTUNNEL_MARK: u32 = 1337;
/// ztunnel reads each ZDS message into a buffer of this size and refuses a truncated one.
const ZDS_BUFFER: usize = 1024;
/// The exit status after a protocol violation (ztunnel drops such a connection).
const EXIT_VIOLATION: i32 = 3;
/// Pass-through connections open at once, at most: a capture loop still shows as hundreds of
/// accepted connections, but cannot take the shared machine's threads and descriptors.
const MAX_PASS_THROUGH: usize = 512;

#[repr(C)]
struct IoVec {
    base: *mut u8,
    len: usize,
}

/// `struct msghdr` of 64-bit Linux (glibc): the compiler adds the padding after `namelen`.
#[repr(C)]
struct MsgHdr {
    name: *mut u8,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut u8,
    controllen: usize,
    flags: i32,
}

extern "C" {
    fn recvmsg(fd: i32, msg: *mut MsgHdr, flags: i32) -> isize;
    fn send(fd: i32, buf: *const u8, len: usize, flags: i32) -> isize;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
}

/// A string for a `key=value` field: bytes outside a safe set as `%XX`, so that a value with
/// spaces, `=` or nothing at all still parses (testkit decodes it).
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._-:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// --- protobuf, by hand --------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field) << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `ZdsHello{version}`; proto3 leaves a zero version out.
fn encode_hello(version: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if version != 0 {
        put_varint(&mut out, 1 << 3);
        put_varint(&mut out, version);
    }
    out
}

/// `WorkloadResponse{ack: Ack{error}}`; the `ack` field is present even when `Ack` is empty.
fn encode_ack(error: &str) -> Vec<u8> {
    let mut ack = Vec::new();
    if !error.is_empty() {
        put_bytes(&mut ack, 1, error.as_bytes());
    }
    let mut out = Vec::new();
    put_bytes(&mut out, 1, &ack);
    out
}

enum Wire<'a> {
    /// No field of a request is a varint; its value is read past and not kept.
    Varint,
    Bytes(&'a [u8]),
    /// A fixed32 or fixed64 (no field of ZDS has one; skipped).
    Fixed,
}

/// Reads the fields of one message, in order.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or("varint cut short")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("field of {n} bytes past the message's end"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The next field's number and value, or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err("field number 0".into());
        }
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Wire::Varint
            }
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let n = self.varint()?;
                Wire::Bytes(self.take(usize::try_from(n).map_err(|_| "length overflows")?)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            // Groups (3, 4) are proto2's; ZDS never has them, so they are refused, not skipped.
            w => return Err(format!("field {number}: unsupported wire type {w}")),
        };
        Ok(Some((number, value)))
    }
}

fn utf8(field: &str, bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{field}: invalid UTF-8"))
}

/// The string fields `wanted` of a message (the last occurrence wins, as in protobuf; other
/// fields are skipped).
fn strings(buf: &[u8], wanted: &[(u64, &str)]) -> Result<Vec<String>, String> {
    let mut out = vec![String::new(); wanted.len()];
    let mut fields = Fields::new(buf);
    while let Some((number, value)) = fields.next_field()? {
        if let Some(i) = wanted.iter().position(|(n, _)| *n == number) {
            match value {
                Wire::Bytes(b) => out[i] = utf8(wanted[i].1, b)?,
                _ => return Err(format!("{}: not length-delimited", wanted[i].1)),
            }
        }
    }
    Ok(out)
}

/// One `WorkloadRequest`.
#[derive(Debug)]
enum Request {
    Add {
        uid: String,
        name: String,
        namespace: String,
        service_account: String,
    },
    Keep {
        uid: String,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Keep { .. } => "keep",
            Request::Del { .. } => "del",
            Request::SnapshotSent => "snapshot_sent",
        }
    }
}

/// Decodes `WorkloadRequest`: oneof payload `add`=1, `del`=2, `snapshot_sent`=3, `keep`=5;
/// the last payload field wins (protobuf's rule for a oneof); unknown fields are skipped; no
/// payload at all is an error.
fn decode_request(buf: &[u8]) -> Result<Request, String> {
    let mut payload = None;
    let mut fields = Fields::new(buf);
    while let Some((number, value)) = fields.next_field()? {
        let bytes = match (number, value) {
            (1 | 2 | 3 | 5, Wire::Bytes(b)) => b,
            (1 | 2 | 3 | 5, _) => return Err(format!("field {number}: not length-delimited")),
            _ => continue,
        };
        payload = Some(match number {
            1 => {
                let mut info = Vec::new();
                let mut uid = String::new();
                let mut add = Fields::new(bytes);
                while let Some((n, v)) = add.next_field()? {
                    match (n, v) {
                        (1, Wire::Bytes(b)) => uid = utf8("AddWorkload.uid", b)?,
                        (2, Wire::Bytes(b)) => info = b.to_vec(),
                        (1 | 2, _) => {
                            return Err(format!("AddWorkload field {n}: wrong wire type"))
                        }
                        _ => {}
                    }
                }
                let mut info = strings(
                    &info,
                    &[
                        (1, "WorkloadInfo.name"),
                        (2, "WorkloadInfo.namespace"),
                        (3, "WorkloadInfo.service_account"),
                    ],
                )?
                .into_iter();
                let mut next = || info.next().unwrap_or_default();
                Request::Add {
                    uid,
                    name: next(),
                    namespace: next(),
                    service_account: next(),
                }
            }
            // DelWorkload's uid is its field 2 (1 is retired).
            2 => Request::Del {
                uid: strings(bytes, &[(2, "DelWorkload.uid")])?.remove(0),
            },
            3 => {
                let mut empty = Fields::new(bytes);
                while empty.next_field()?.is_some() {}
                Request::SnapshotSent
            }
            _ => Request::Keep {
                uid: strings(bytes, &[(1, "KeepWorkload.uid")])?.remove(0),
            },
        });
    }
    payload.ok_or_else(|| "WorkloadRequest without a payload".to_string())
}

// --- the ZDS connection -------------------------------------------------------------------

/// Connects a SOCK_SEQPACKET socket to `path`, retrying for about 5 s while the socket does
/// not exist yet or nobody listens (ztunnel may start before the agent); a fatal line and
/// exit 1 otherwise.
fn connect_zds(path: &str) -> RawFd {
    let mut addr = vec![0u8; 110];
    addr[0..2].copy_from_slice(&(AF_UNIX as u16).to_ne_bytes());
    if path.len() >= 108 {
        say(&format!("fatal zds path too long: {path}"));
        std::process::exit(1);
    }
    addr[2..2 + path.len()].copy_from_slice(path.as_bytes());
    let len = (2 + path.len() + 1) as u32;
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // SAFETY: plain syscalls on a descriptor this function owns; addr outlives them.
        let e = unsafe {
            let fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
            if fd < 0 {
                say(&format!("fatal socket errno={}", errno()));
                std::process::exit(1);
            }
            if connect(fd, addr.as_ptr(), len) == 0 {
                return fd;
            }
            let e = errno();
            close(fd);
            e
        };
        let retry = matches!(e, ENOENT | ECONNREFUSED | EAGAIN);
        if !retry || Instant::now() > deadline {
            say(&format!("fatal connect {path} errno={e}"));
            std::process::exit(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends one packet; `Err(errno)`.
fn send_packet(fd: RawFd, bytes: &[u8]) -> Result<(), i32> {
    loop {
        // SAFETY: bytes is a live slice of bytes.len() bytes.
        let n = unsafe { send(fd, bytes.as_ptr(), bytes.len(), MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = errno();
        if e != EINTR {
            return Err(e);
        }
    }
}

/// One received packet: its bytes and the descriptors that came with it.
enum Packet {
    Message(Vec<u8>, Vec<std::os::fd::OwnedFd>),
    Closed,
}

/// Receives one packet as ztunnel does: into 1024 bytes, descriptors close-on-exec, a
/// truncated message or truncated control data refused. The control buffer has room for
/// several descriptors (ztunnel's for one), so that an extra descriptor is reported as such
/// rather than as truncation; either way it is refused.
fn recv_packet(fd: RawFd) -> Result<Packet, String> {
    use std::os::fd::OwnedFd;
    let mut buf = [0u8; ZDS_BUFFER];
    // u64s: a cmsghdr must be 8-byte aligned.
    let mut control = [0u64; 8];
    let mut iov = IoVec {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let mut msg = MsgHdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr() as *mut u8,
        controllen: std::mem::size_of_val(&control),
        flags: 0,
    };
    let n = loop {
        // SAFETY: msg points at live buffers of the sizes it states.
        let n = unsafe { recvmsg(fd, &mut msg, MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = errno();
        if e == ECONNRESET {
            return Ok(Packet::Closed);
        }
        if e != EINTR {
            return Err(format!("recvmsg errno={e}"));
        }
    };
    // Take ownership of every descriptor first, so that each is closed whatever follows.
    let mut fds = Vec::new();
    let mut other_cmsgs = 0;
    let bytes = control.as_ptr() as *const u8;
    let mut off = 0usize;
    while off + 16 <= msg.controllen {
        // SAFETY: off + 16 <= controllen <= the buffer's size; the header is read unaligned.
        let (len, level, kind) = unsafe {
            (
                std::ptr::read_unaligned(bytes.add(off) as *const usize),
                std::ptr::read_unaligned(bytes.add(off + 8) as *const i32),
                std::ptr::read_unaligned(bytes.add(off + 12) as *const i32),
            )
        };
        if len < 16 || off + len > msg.controllen {
            break;
        }
        if level == SOL_SOCKET && kind == SCM_RIGHTS {
            for i in 0..(len - 16) / 4 {
                // SAFETY: within this cmsg's data; the kernel installed these descriptors.
                let raw =
                    unsafe { std::ptr::read_unaligned(bytes.add(off + 16 + 4 * i) as *const i32) };
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        } else {
            other_cmsgs += 1;
        }
        off += (len + 7) & !7;
    }
    if msg.flags & MSG_TRUNC != 0 {
        return Err(format!("message truncated (over {ZDS_BUFFER} bytes)"));
    }
    if msg.flags & MSG_CTRUNC != 0 {
        return Err("control data truncated".into());
    }
    if other_cmsgs > 0 {
        return Err(format!(
            "{other_cmsgs} control messages other than SCM_RIGHTS"
        ));
    }
    if n == 0 && fds.is_empty() {
        return Ok(Packet::Closed);
    }
    Ok(Packet::Message(buf[..n].to_vec(), fds))
}

/// A protocol violation: reported, and the connection dropped by exiting (ztunnel drops the
/// connection too, and reconnects later; a test starts a new fake for that).
fn violation(what: &str) -> ! {
    say(&format!("error {what}"));
    std::process::exit(EXIT_VIOLATION);
}

// --- one pod's listeners ------------------------------------------------------------------

/// What a pod's TCP listener is for (ztunnel's ports).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Outbound,
    Inbound,
    Hbone,
    Dns,
}

/// Options of the fake that shape each connection.
#[derive(Clone, Copy)]
pub(super) struct InPodStyle {
    pub(super) pass_through: bool,
    /// Connect again when the agent closes the connection, keeping the pods (ztunnel's way).
    pub(super) reconnect: bool,
}

/// One pod's listeners, open in its network namespace. `close` shuts them and waits for
/// their threads, so that the pod's ports refuse connections before `del` is acked.
struct Pod {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Duplicates of the listening sockets, kept until the threads are gone, so that
    /// `shutdown` never reaches a descriptor number that was closed and used again.
    sockets: Vec<std::os::fd::OwnedFd>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The namespace stays referenced for as long as ztunnel keeps the pod, as ztunnel does.
    _netns: std::fs::File,
    /// The namespace's device and inode, ztunnel's `NetnsID`: an add in the same namespace
    /// changes nothing.
    netns_id: (u64, u64),
}

static PASS_THROUGH_LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn set_int_opt(fd: RawFd, level: i32, opt: i32, value: &[u8]) -> Result<(), i32> {
    // SAFETY: value is a live slice of the stated length.
    if unsafe { setsockopt(fd, level, opt, value.as_ptr(), value.len() as u32) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// ztunnel's mark, and a receive timeout that wakes a blocked accept or recv now and then
/// (a safety net: `close` wakes them with `shutdown` at once).
fn prepare_listener(fd: RawFd) -> Result<(), String> {
    set_int_opt(fd, SOL_SOCKET, SO_MARK, &ZTUNNEL_MARK.to_ne_bytes())
        .map_err(|e| format!("SO_MARK errno={e}"))?;
    // struct timeval {tv_sec: i64, tv_usec: i64}: 200 ms.
    let mut tv = [0u8; 16];
    tv[8..16].copy_from_slice(&200_000i64.to_ne_bytes());
    set_int_opt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv).map_err(|e| format!("SO_RCVTIMEO errno={e}"))
}

impl Pod {
    /// Enters `netns` on a new thread and opens ztunnel's listeners there: TCP `[::]:15001`,
    /// `[::]:15006`, `[::]:15008` (dual stack), TCP and UDP `127.0.0.1:15053` and
    /// `[::1]:15053`. Threads started from that thread share its namespace, so that the
    /// pass-through connects leave from the pod's namespace, as ztunnel's do.
    fn open(
        uid: &str,
        netns: std::fs::File,
        netns_id: (u64, u64),
        style: InPodStyle,
    ) -> Result<Pod, String> {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_fd = netns.as_raw_fd();
        let (uid, thread_stop) = (uid.to_string(), stop.clone());
        std::thread::spawn(move || {
            let _ = tx.send(open_in_netns(ns_fd, &uid, &thread_stop, style));
        });
        // netns stays open (in Pod) until the thread has answered, so ns_fd is valid.
        let (sockets, threads) = rx
            .recv()
            .map_err(|_| "listener thread died".to_string())??;
        Ok(Pod {
            stop,
            sockets,
            threads,
            _netns: netns,
            netns_id,
        })
    }

    fn close(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for socket in &self.sockets {
            // SAFETY: shutdown on a descriptor this pod owns; it wakes accept and recv.
            unsafe {
                shutdown(socket.as_raw_fd(), SHUT_RDWR);
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

type PodParts = (Vec<std::os::fd::OwnedFd>, Vec<std::thread::JoinHandle<()>>);

fn open_in_netns(
    ns_fd: RawFd,
    uid: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    style: InPodStyle,
) -> Result<PodParts, String> {
    use std::net::UdpSocket;
    use std::os::fd::OwnedFd;
    // SAFETY: setns on a namespace descriptor, for this thread only.
    if unsafe { setns(ns_fd, CLONE_NEWNET) } != 0 {
        return Err(format!("setns errno={}", errno()));
    }
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let tcp = [
        (SocketAddr::new(any6, 15001), Role::Outbound),
        (SocketAddr::new(any6, 15006), Role::Inbound),
        (SocketAddr::new(any6, 15008), Role::Hbone),
        (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15053),
            Role::Dns,
        ),
        (
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 15053),
            Role::Dns,
        ),
    ];
    let udp = [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15053),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 15053),
    ];
    // Bind everything before starting anything: a failure leaves nothing open.
    let mut listeners = Vec::new();
    for (addr, role) in tcp {
        let l = TcpListener::bind(addr)
            .map_err(|e| format!("bind tcp {addr} errno={}", errno_of(&e)))?;
        prepare_listener(l.as_raw_fd())?;
        listeners.push((l, role));
    }
    let mut udps = Vec::new();
    for addr in udp {
        let s =
            UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr} errno={}", errno_of(&e)))?;
        prepare_listener(s.as_raw_fd())?;
        udps.push(s);
    }
    // Duplicates first: once a thread runs, nothing may fail any more (it would run on).
    let mut sockets: Vec<OwnedFd> = Vec::new();
    for fd in listeners
        .iter()
        .map(|(l, _)| l.as_raw_fd())
        .chain(udps.iter().map(|s| s.as_raw_fd()))
    {
        // SAFETY: a descriptor owned by a socket alive for this whole loop.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        sockets.push(borrowed.try_clone_to_owned().map_err(|e| e.to_string())?);
    }
    let mut threads = Vec::new();
    for (listener, role) in listeners {
        let (uid, stop) = (uid.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || {
            accept_loop(listener, role, &uid, &stop, style)
        }));
    }
    for socket in udps {
        let (uid, stop) = (uid.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || {
            dns_udp_loop(socket, &uid, &stop)
        }));
    }
    Ok((sockets, threads))
}

fn stopped(stop: &std::sync::atomic::AtomicBool) -> bool {
    stop.load(std::sync::atomic::Ordering::SeqCst)
}

fn accept_loop(
    listener: TcpListener,
    role: Role,
    uid: &str,
    stop: &std::sync::atomic::AtomicBool,
    style: InPodStyle,
) {
    loop {
        match listener.accept() {
            _ if stopped(stop) => return,
            Ok((stream, _)) => {
                let uid = uid.to_string();
                std::thread::spawn(move || handle_pod_connection(stream, role, &uid, style));
            }
            Err(e) if matches!(errno_of(&e), EAGAIN | EINTR) => {}
            // Out of descriptors and the like: do not spin.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// ztunnel's DNS proxy, faked: each datagram is answered with `zbt-dns:` and the datagram.
fn dns_udp_loop(socket: std::net::UdpSocket, uid: &str, stop: &std::sync::atomic::AtomicBool) {
    let mut buf = [0u8; 1500];
    let local = socket.local_addr().expect("bound");
    loop {
        let got = socket.recv_from(&mut buf);
        if stopped(stop) {
            return;
        }
        if let Ok((n, from)) = got {
            say(&format!("udp local={local} peer={from} uid={}", enc(uid)));
            let mut reply = b"zbt-dns:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// ztunnel's connect onward from the pod's namespace: marked, and for inbound bound to the
/// client's address (original source, transparent) as ztunnel does.
fn pass_through_connect(
    bind_ip: Option<IpAddr>,
    dst: SocketAddr,
) -> Result<(SocketAddr, TcpStream), i32> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let domain = if dst.is_ipv4() { AF_INET } else { AF_INET6 };
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let stream = TcpStream::from_raw_fd(fd);
        set_int_opt(fd, SOL_SOCKET, SO_MARK, &ZTUNNEL_MARK.to_ne_bytes())?;
        if let Some(ip) = bind_ip.map(|ip| ip.to_canonical()) {
            if ip.is_ipv4() == dst.is_ipv4() {
                let (level, opt) = if dst.is_ipv4() {
                    (SOL_IP, IP_TRANSPARENT)
                } else {
                    (SOL_IPV6, IPV6_TRANSPARENT)
                };
                set_int_opt(fd, level, opt, &1i32.to_ne_bytes())?;
                let src = sockaddr(SocketAddr::new(ip, 0));
                if bind(fd, src.as_ptr(), src.len() as u32) != 0 {
                    return Err(errno());
                }
            }
        }
        let to = sockaddr(dst);
        if connect(fd, to.as_ptr(), to.len() as u32) != 0 {
            return Err(errno());
        }
        let local = stream.local_addr().map_err(|e| errno_of(&e))?;
        Ok((local, stream))
    }
}

/// Copies both ways until each side has closed (a proxy's inner loop).
fn splice(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut client_in), Ok(mut upstream_out)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut upstream_out);
        let _ = upstream_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut upstream_in, mut client_out) = (upstream, client);
    let _ = std::io::copy(&mut upstream_in, &mut client_out);
    let _ = client_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// One connection to a pod's listener. 15001 and 15006 ask the original destination as
/// ztunnel does; without an answer ztunnel uses the socket's local address, which for 15006
/// is the original destination (the kernel handed the connection over unchanged). With
/// pass-through the fake connects there and proxies; a destination that is the listener
/// itself on loopback is refused (`upstream-errno=40`, ELOOP), as ztunnel refuses a call to
/// itself. Without pass-through, or on 15008, it echoes one byte; 15053 echoes everything.
fn handle_pod_connection(mut stream: TcpStream, role: Role, uid: &str, style: InPodStyle) {
    use std::sync::atomic::Ordering;
    let _ = stream.set_read_timeout(None);
    let mut line = format!("{} uid={}", accept_line(&stream), enc(uid));
    match role {
        Role::Hbone => {
            say(&line);
            echo_one(&mut stream);
        }
        Role::Dns => {
            say(&line);
            if let Ok(mut reader) = stream.try_clone() {
                let _ = std::io::copy(&mut reader, &mut stream);
            }
        }
        Role::Outbound | Role::Inbound => {
            let orig = ask_original_dst(&stream);
            match orig {
                Ok(dst) => line.push_str(&format!(" orig={dst}")),
                Err(e) => line.push_str(&format!(" orig-errno={e}")),
            }
            if !style.pass_through {
                say(&line);
                echo_one(&mut stream);
                return;
            }
            let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
                say(&line);
                return;
            };
            let dst = orig.unwrap_or(local);
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let upstream =
                if canonical(dst) == canonical(local) && local.ip().to_canonical().is_loopback() {
                    Err(ELOOP)
                } else if PASS_THROUGH_LIVE.fetch_add(1, Ordering::SeqCst) >= MAX_PASS_THROUGH {
                    PASS_THROUGH_LIVE.fetch_sub(1, Ordering::SeqCst);
                    Err(EMFILE)
                } else {
                    let bind_ip = (role == Role::Inbound).then(|| peer.ip());
                    let result = pass_through_connect(bind_ip, dst);
                    if result.is_err() {
                        PASS_THROUGH_LIVE.fetch_sub(1, Ordering::SeqCst);
                    }
                    result
                };
            match upstream {
                Ok((up_local, up)) => {
                    line.push_str(&format!(" upstream-local={up_local}"));
                    say(&line);
                    splice(stream, up);
                    PASS_THROUGH_LIVE.fetch_sub(1, Ordering::SeqCst);
                }
                // ztunnel closes a connection it cannot take anywhere.
                Err(e) => {
                    line.push_str(&format!(" upstream-errno={e}"));
                    say(&line);
                }
            }
        }
    }
}

/// The fake in-pod ztunnel's main loop (see the file's doc comment).
pub(super) fn inpod_ztunnel(
    zds: &str,
    nacks: Vec<(String, u32)>,
    no_ack: bool,
    style: InPodStyle,
    hello_version: u64,
) {
    use std::collections::{HashMap, HashSet};
    use std::os::unix::fs::MetadataExt;
    // Connects and says hello: at start, and with --reconnect after each session's end.
    let session = || {
        let fd = connect_zds(zds);
        if let Err(e) = send_packet(fd, &encode_hello(hello_version)) {
            say(&format!("fatal send hello errno={e}"));
            std::process::exit(1);
        }
        say("ready");
        fd
    };
    let mut fd = session();
    let mut nacks_left: HashMap<String, u32> = HashMap::new();
    for (uid, n) in nacks {
        *nacks_left.entry(uid).or_default() += n;
    }
    let mut pods: HashMap<String, Pod> = HashMap::new();
    // ztunnel's reconcile: the pods added or kept in this session before its snapshot's end.
    let mut in_snapshot: HashSet<String> = HashSet::new();
    let mut snapshot_received = false;
    // The session ended: exit, or (ztunnel's way) keep the pods and connect again.
    let closed = |fd: RawFd, snapshot_received: &mut bool, in_snapshot: &mut HashSet<String>| {
        say("closed");
        if !style.reconnect {
            std::process::exit(0);
        }
        // SAFETY: the session's descriptor, not used after this.
        unsafe { close(fd) };
        *snapshot_received = false;
        in_snapshot.clear();
        session()
    };
    loop {
        let (bytes, mut fds) = match recv_packet(fd) {
            Ok(Packet::Message(bytes, fds)) => (bytes, fds),
            Ok(Packet::Closed) => {
                fd = closed(fd, &mut snapshot_received, &mut in_snapshot);
                continue;
            }
            Err(e) => violation(&e),
        };
        let request = decode_request(&bytes).unwrap_or_else(|e| violation(&format!("decode: {e}")));
        match (&request, fds.len()) {
            (Request::Add { .. }, 1) => {}
            (Request::Add { uid, .. }, n) => {
                violation(&format!("add uid={} with {n} descriptors, not 1", enc(uid)))
            }
            (_, 0) => {}
            (other, n) => violation(&format!("{} with {n} descriptors", other.kind())),
        }
        let error = match request {
            Request::Add {
                uid,
                name,
                namespace,
                service_account,
            } => {
                let netns = std::fs::File::from(fds.remove(0));
                let netns_id = netns
                    .metadata()
                    .map(|m| (m.dev(), m.ino()))
                    .unwrap_or((0, 0));
                let added = format!(
                    "add uid={} name={} namespace={} sa={} netns={}",
                    enc(&uid),
                    enc(&name),
                    enc(&namespace),
                    enc(&service_account),
                    netns_id.1
                );
                if !snapshot_received {
                    in_snapshot.insert(uid.clone());
                }
                // An add of a pod already held in the same namespace is idempotent, as in
                // ztunnel (its listeners stay open, so no connect is refused meanwhile); in
                // another namespace (a sandbox created again) it replaces the pod.
                let result = if pods.get(&uid).is_some_and(|held| held.netns_id == netns_id) {
                    Ok(())
                } else {
                    if let Some(old) = pods.remove(&uid) {
                        old.close();
                    }
                    match nacks_left.get_mut(&uid).filter(|n| **n > 0) {
                        Some(n) => {
                            *n -= 1;
                            Err("fake nack".to_string())
                        }
                        None => Pod::open(&uid, netns, netns_id, style)
                            .map(|pod| drop(pods.insert(uid.clone(), pod))),
                    }
                };
                // Reported once carried out, so that a test that saw the add can connect to
                // the listeners (unless a nack follows) even from a fake that never acks.
                say(&added);
                match result {
                    Ok(()) => String::new(),
                    Err(e) => {
                        say(&format!("nack uid={} error={}", enc(&uid), enc(&e)));
                        e
                    }
                }
            }
            Request::Del { uid } => {
                say(&format!("del uid={}", enc(&uid)));
                if let Some(pod) = pods.remove(&uid) {
                    pod.close();
                }
                String::new()
            }
            Request::Keep { uid } => {
                say(&format!("keep uid={}", enc(&uid)));
                if snapshot_received {
                    violation(&format!("keep uid={} after snapshot_sent", enc(&uid)));
                }
                in_snapshot.insert(uid);
                String::new()
            }
            Request::SnapshotSent => {
                say("snapshot");
                if snapshot_received {
                    violation("a second snapshot_sent");
                }
                snapshot_received = true;
                // Sorted, so that the lines come in one order.
                let mut dropped: Vec<String> = pods
                    .keys()
                    .filter(|uid| !in_snapshot.contains(*uid))
                    .cloned()
                    .collect();
                dropped.sort();
                for uid in dropped {
                    if let Some(pod) = pods.remove(&uid) {
                        pod.close();
                    }
                    say(&format!("dropped uid={}", enc(&uid)));
                }
                in_snapshot.clear();
                String::new()
            }
        };
        if no_ack {
            continue;
        }
        match send_packet(fd, &encode_ack(&error)) {
            Ok(()) => {}
            Err(EPIPE | ECONNRESET) => {
                fd = closed(fd, &mut snapshot_received, &mut in_snapshot);
            }
            Err(e) => violation(&format!("send ack errno={e}")),
        }
    }
}
