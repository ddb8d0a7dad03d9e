//! `zbt-net inpod-ztunnel`: a fake in-pod ztunnel (ztunnel's `shared` mode), written from the
//! ZDS protocol (`istio.workload.zds`), not from ztunnel's code. Its protobuf is encoded and
//! decoded by hand here, so that the agent's prost messages are checked against an
//! independent reading of the `.proto`.
//!
//! It connects to the agent's SOCK_SEQPACKET socket, says hello (version V1), and answers
//! every request with an ack. For each `add` it opens ztunnel's listeners INSIDE the network
//! namespace that came with it (a thread `setns`es into the descriptor): TCP `[::]:15001`,
//! `[::]:15006`, `[::]:15008`, and DNS on `127.0.0.1:15053` and `[::1]:15053` (TCP and UDP),
//! and acks only once they are bound. Connections are reported like `serve`'s, with the pod's
//! uid: `accept uid=U local=A peer=P orig=O|orig-errno=N`; on 15006 the original destination
//! is asked too (zbridge answers it with the accepted socket's local address). `del` closes the
//! pod's listeners. Lines:
//!
//! ```text
//! zbt-net inpod-ztunnel --zds PATH [--nack UID:N]... [--upstream]
//!     ready                                   (connected, hello sent)
//!     add uid=U namespace=NS name=N sa=SA netns=INODE    (listeners bound; then acked)
//!     nack uid=U                              (--nack: refused, nothing opened)
//!     del uid=U | keep uid=U | snapshot
//!     accept uid=U local=A peer=P orig=O|orig-errno=N [upstream-local=L|upstream-errno=N]
//!     dns uid=U local=A peer=P                (a UDP question, echoed back)
//!     error WHAT                              (a malformed request: answered with an error)
//!     closed                                  (the agent closed the connection; exit 0)
//! ```

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{accept_line, ask_original_dst, echo_one, say, upstream};

const AF_UNIX: i32 = 1;
const SOCK_SEQPACKET: i32 = 5;
const SOCK_CLOEXEC: i32 = 0o2000000;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
const MSG_CMSG_CLOEXEC: i32 = 0x40000000;
const MSG_TRUNC: i32 = 0x20;
const MSG_CTRUNC: i32 = 0x08;
const CLONE_NEWNET: i32 = 0x40000000;
const SHUT_RDWR: i32 = 2;

#[repr(C)]
struct Iovec {
    base: *mut u8,
    len: usize,
}

#[repr(C)]
struct Msghdr {
    name: *mut u8,
    namelen: u32,
    iov: *mut Iovec,
    iovlen: usize,
    control: *mut u8,
    controllen: usize,
    flags: i32,
}

#[repr(C)]
struct Cmsghdr {
    len: usize,
    level: i32,
    kind: i32,
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const u8, len: u32) -> i32;
    fn send(fd: i32, buf: *const u8, len: usize, flags: i32) -> isize;
    fn recvmsg(fd: i32, msg: *mut Msghdr, flags: i32) -> isize;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn close(fd: i32) -> i32;
}

/// One pod's listeners, kept to close them on `del`.
struct Pod {
    fds: Vec<RawFd>,
}

pub fn run(args: &[String]) {
    let mut zds = None;
    let mut nacks: HashMap<String, u32> = HashMap::new();
    let mut up = false;
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--zds" => zds = Some(value),
            "--nack" => {
                let (uid, n) = value.rsplit_once(':').expect("--nack UID:N");
                nacks.insert(uid.to_string(), n.parse().expect("--nack UID:N"));
            }
            "--upstream" => {
                up = true;
                i += 1;
                continue;
            }
            other => panic!("inpod-ztunnel: unknown argument {other}"),
        }
        i += 2;
    }
    let fd = connect_retrying(&zds.expect("--zds PATH"));
    send_msg(fd, &[0x08, 0x01]); // ZdsHello { version: V1 }
    say("ready");
    let mut pods: HashMap<String, Pod> = HashMap::new();
    loop {
        let (msg, netns) = match recv_msg(fd) {
            Ok(Some(m)) => m,
            Ok(None) => {
                say("closed");
                std::process::exit(0);
            }
            Err(what) => {
                say(&format!("error {what}"));
                send_msg(fd, &ack(&what));
                continue;
            }
        };
        let Some((field, body)) = first_message_field(&msg) else {
            say("error a request without a payload");
            send_msg(fd, &ack("no payload"));
            continue;
        };
        match (field, netns) {
            (1, Some(netns)) => {
                let uid = string_field(body, 1).unwrap_or_default();
                let info = message_field(body, 2).unwrap_or_default();
                let (name, namespace, sa) = (
                    string_field(&info, 1).unwrap_or_default(),
                    string_field(&info, 2).unwrap_or_default(),
                    string_field(&info, 3).unwrap_or_default(),
                );
                if let Some(left) = nacks.get_mut(&uid).filter(|n| **n > 0) {
                    *left -= 1;
                    // SAFETY: the descriptor we were passed and own.
                    unsafe { close(netns) };
                    say(&format!("nack uid={uid}"));
                    send_msg(fd, &ack("fake nack"));
                    continue;
                }
                // SAFETY: the descriptor we were passed; the File owns it from here.
                let ns_file = unsafe { std::fs::File::from_raw_fd(netns) };
                let inode = std::os::unix::fs::MetadataExt::ino(&ns_file.metadata().unwrap());
                if let Some(old) = pods.remove(&uid) {
                    close_pod(old);
                }
                match open_listeners(&ns_file, &uid, up) {
                    Ok(pod) => {
                        pods.insert(uid.clone(), pod);
                        say(&format!(
                            "add uid={uid} namespace={namespace} name={name} sa={sa} netns={inode}"
                        ));
                        send_msg(fd, &ack(""));
                    }
                    Err(e) => {
                        say(&format!("error opening listeners for {uid}: {e}"));
                        send_msg(fd, &ack(&format!("listeners: {e}")));
                    }
                }
            }
            (1, None) => {
                say("error an add without a network namespace");
                send_msg(fd, &ack("no network namespace"));
            }
            (_, Some(extra)) => {
                // SAFETY: a descriptor we were passed and do not want.
                unsafe { close(extra) };
                say("error a descriptor with a request that takes none");
                send_msg(fd, &ack("unexpected descriptor"));
            }
            (2, None) => {
                let uid = string_field(body, 2).unwrap_or_default();
                if let Some(pod) = pods.remove(&uid) {
                    close_pod(pod);
                }
                say(&format!("del uid={uid}"));
                send_msg(fd, &ack(""));
            }
            (5, None) => {
                say(&format!("keep uid={}", string_field(body, 1).unwrap_or_default()));
                send_msg(fd, &ack(""));
            }
            (3, None) => {
                say("snapshot");
                send_msg(fd, &ack(""));
            }
            (other, None) => {
                say(&format!("error unknown request field {other}"));
                send_msg(fd, &ack("unknown request"));
            }
        }
    }
}

fn connect_retrying(path: &str) -> RawFd {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut addr = vec![0u8; 110];
    addr[0..2].copy_from_slice(&(AF_UNIX as u16).to_ne_bytes());
    addr[2..2 + path.len()].copy_from_slice(path.as_bytes());
    loop {
        // SAFETY: plain syscalls on a descriptor this function owns.
        unsafe {
            let fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket");
            if connect(fd, addr.as_ptr(), (2 + path.len() + 1) as u32) == 0 {
                return fd;
            }
            close(fd);
        }
        if Instant::now() > deadline {
            say(&format!("fatal connect {path}: {}", std::io::Error::last_os_error()));
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send_msg(fd: RawFd, bytes: &[u8]) {
    // SAFETY: a buffer of the given length.
    if unsafe { send(fd, bytes.as_ptr(), bytes.len(), 0) } < 0 {
        say("closed");
        std::process::exit(0);
    }
}

/// One request and the descriptor that came with it; `None` at the end of the connection.
fn recv_msg(fd: RawFd) -> Result<Option<(Vec<u8>, Option<RawFd>)>, String> {
    // ztunnel's own buffer size: a longer request is truncated and refused.
    let mut buf = vec![0u8; 1024];
    let mut control = [0u64; 8];
    let mut iov = Iovec {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let mut msg = Msghdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr() as *mut u8,
        controllen: std::mem::size_of_val(&control),
        flags: 0,
    };
    // SAFETY: msg points at live buffers of the lengths given.
    let n = unsafe { recvmsg(fd, &mut msg, MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(format!("recvmsg: {}", std::io::Error::last_os_error()));
    }
    let mut passed = None;
    if msg.controllen >= std::mem::size_of::<Cmsghdr>() {
        // SAFETY: the kernel wrote a cmsghdr at the start of the control buffer.
        let cmsg = unsafe { &*(control.as_ptr() as *const Cmsghdr) };
        if cmsg.level == SOL_SOCKET && cmsg.kind == SCM_RIGHTS {
            let data = unsafe { (control.as_ptr() as *const u8).add(std::mem::size_of::<Cmsghdr>()) };
            passed = Some(unsafe { std::ptr::read_unaligned(data as *const i32) });
        }
    }
    if msg.flags & (MSG_TRUNC | MSG_CTRUNC) != 0 {
        return Err("a truncated request".into());
    }
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(n as usize);
    Ok(Some((buf, passed)))
}

/// `WorkloadResponse { ack: Ack { error } }`.
fn ack(error: &str) -> Vec<u8> {
    let mut inner = Vec::new();
    if !error.is_empty() {
        inner.push(0x0a);
        varint(error.len() as u64, &mut inner);
        inner.extend_from_slice(error.as_bytes());
    }
    let mut out = vec![0x0a];
    varint(inner.len() as u64, &mut out);
    out.extend(inner);
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a message: (field number, length-delimited body); other wire types skipped.
fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        match key & 7 {
            0 => {
                read_varint(b, &mut at)?;
            }
            2 => {
                let len = read_varint(b, &mut at)? as usize;
                let body = b.get(at..at + len)?;
                at += len;
                out.push((key >> 3, body));
            }
            5 => at += 4,
            1 => at += 8,
            _ => return None,
        }
    }
    Some(out)
}

fn first_message_field(b: &[u8]) -> Option<(u64, &[u8])> {
    fields(b)?.into_iter().next()
}

fn message_field(b: &[u8], number: u64) -> Option<Vec<u8>> {
    fields(b)?
        .into_iter()
        .find(|(n, _)| *n == number)
        .map(|(_, body)| body.to_vec())
}

fn string_field(b: &[u8], number: u64) -> Option<String> {
    message_field(b, number).map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Binds ztunnel's listeners inside `netns` (from a thread that enters it) and serves them.
fn open_listeners(netns: &std::fs::File, uid: &str, up: bool) -> std::io::Result<Pod> {
    let ns = netns.try_clone()?;
    let (tcp, udp) = std::thread::spawn(move || -> std::io::Result<_> {
        // SAFETY: setns on an open namespace descriptor, for this thread only.
        if unsafe { setns(ns.as_raw_fd(), CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut tcp = Vec::new();
        for addr in ["[::]:15001", "[::]:15006", "[::]:15008", "127.0.0.1:15053", "[::1]:15053"] {
            tcp.push(TcpListener::bind(addr.parse::<SocketAddr>().unwrap())?);
        }
        let mut udp = Vec::new();
        for addr in ["127.0.0.1:15053", "[::1]:15053"] {
            udp.push(UdpSocket::bind(addr.parse::<SocketAddr>().unwrap())?);
        }
        Ok((tcp, udp))
    })
    .join()
    .expect("listener thread")?;
    let mut fds = Vec::new();
    for listener in tcp {
        fds.push(listener.as_raw_fd());
        let uid = uid.to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { return };
                let uid = uid.clone();
                std::thread::spawn(move || {
                    let mut line = accept_line(&stream).replacen("accept ", &format!("accept uid={uid} "), 1);
                    let mut upstream_stream = None;
                    match ask_original_dst(&stream) {
                        Ok(dst) => {
                            line.push_str(&format!(" orig={dst}"));
                            if up {
                                let peer = stream.peer_addr().expect("a connected peer");
                                match upstream(peer.ip().to_canonical(), dst) {
                                    Ok((l, s)) => {
                                        line.push_str(&format!(" upstream-local={l}"));
                                        upstream_stream = Some(s);
                                    }
                                    Err(e) => line.push_str(&format!(" upstream-errno={e}")),
                                }
                            }
                        }
                        Err(e) => line.push_str(&format!(" orig-errno={e}")),
                    }
                    say(&line);
                    if let Some(mut s) = upstream_stream {
                        let _ = s.write_all(b"u");
                    }
                    echo_one(&mut stream);
                });
            }
        });
    }
    for socket in udp {
        fds.push(socket.as_raw_fd());
        let uid = uid.to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                // Shut down (`del`): reads return nothing from then on.
                if n == 0 {
                    return;
                }
                let local = socket.local_addr().expect("bound");
                say(&format!("dns uid={uid} local={local} peer={from}"));
                let _ = socket.send_to(&buf[..n], from);
            }
        });
    }
    Ok(Pod { fds })
}

/// Closes a pod's listeners: their accept and receive loops end.
fn close_pod(pod: Pod) {
    for fd in pod.fds {
        // SAFETY: shutdown wakes the thread blocked on the socket, which then drops it.
        unsafe { shutdown(fd, SHUT_RDWR) };
    }
}
