//! `zbt-net`: the network helper process of zbridge's privileged tests and benchmarks.
//!
//! Tests place it in a cgroup and a network namespace (testkit joins both before exec), so
//! that the BPF programs see it exactly as they would see a pod, a host process or ztunnel.
//! It is built by testkit's build script with std alone (no crates), and reports what
//! happened as one line per event on stdout, which testkit parses.
//!
//! ```text
//! zbt-net serve --listen ADDR:PORT... [--orig-dst] [--upstream]
//!     accept local=A peer=P orig=O|orig-errno=N [upstream-local=L|upstream-errno=N]
//! zbt-net serve --listen ADDR:PORT --ask-after N [--sol-ip-only | --ask-twice]
//!     (holds N accepted connections, then asks each; with --sol-ip-only, only the first of
//!     ztunnel's two questions; with --ask-twice, both once more after the answer)
//!     accept local=A peer=P orig=O|orig-errno=N
//! zbt-net sleep
//!     ready           (then nothing, until killed)
//! zbt-net connect --to ADDR:PORT [--count N] [--bind IP|IP:PORT]... [--no-echo] [--rst]
//!                 [--latency]
//!     ok local=A peer=P       (or: err stage=connect|io errno=N)
//!     latency-ns=N            (with --latency, instead of the above)
//! zbt-net udp-connect --to ADDR:PORT
//!     ok local=A peer=P       (the peer the kernel kept after connect(); or: err ...)
//! zbt-net inpod-ztunnel --zds PATH [--nack UID:N]... [--no-ack] [--pass-through]
//!                       [--hello-version N] [--reconnect]
//!     ready                   (connected, ZdsHello sent; again after each reconnect)
//!     add uid=U name=N namespace=NS sa=SA netns=INODE
//!     nack uid=U error=E      (the add was answered with this error)
//!     del uid=U | keep uid=U | snapshot
//!     accept local=A peer=P uid=U [orig=O|orig-errno=N] [upstream-local=L|upstream-errno=N]
//!     udp local=A peer=P uid=U
//!     dropped uid=U           (--reconnect: not in the new session's snapshot, closed)
//!     closed                  (the agent closed the connection; exit 0, or with
//!                              --reconnect, connect again)
//!     error WHAT              (a protocol violation; exit 3)
//!     fatal WHAT              (cannot connect or send the hello; exit 1)
//! ```
//!
//! `inpod-ztunnel` is ztunnel in `shared` mode, speaking ZDS: `inpod_ztunnel.rs` says what it
//! does.
//!
//! Strings in lines are `%XX`-escaped outside `[A-Za-z0-9._:/-]`.

mod inpod_ztunnel;

use inpod_ztunnel::{inpod_ztunnel, InPodStyle};

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Mutex;
use std::time::Instant;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80.
const SO_ORIGINAL_DST: i32 = 80;
const IP_TRANSPARENT: i32 = 19;
const IPV6_TRANSPARENT: i32 = 75;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const SOL_SOCKET: i32 = 1;
const SO_LINGER: i32 = 13;

extern "C" {
    fn getsockopt(fd: i32, level: i32, name: i32, val: *mut u8, len: *mut u32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const u8, len: u32) -> i32;
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn bind(fd: i32, addr: *const u8, len: u32) -> i32;
    fn connect(fd: i32, addr: *const u8, len: u32) -> i32;
    fn close(fd: i32) -> i32;
}

static OUT: Mutex<()> = Mutex::new(());

fn say(line: &str) {
    let _guard = OUT.lock().unwrap();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// A `sockaddr_in`/`sockaddr_in6` as bytes.
fn sockaddr(addr: SocketAddr) -> Vec<u8> {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = vec![0u8; 16];
            b[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            b
        }
        SocketAddr::V6(a) => {
            let mut b = vec![0u8; 28];
            b[0..2].copy_from_slice(&(AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b
        }
    }
}

fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([b[0], b[1]]) as i32;
    let port = u16::from_be_bytes([b[2], b[3]]);
    match family {
        AF_INET => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])),
            port,
        )),
        AF_INET6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[8..24]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => None,
    }
}

/// ztunnel's two questions, in its order, whatever the socket's family: `SO_ORIGINAL_DST`
/// (`SOL_IP`), then `IP6T_SO_ORIGINAL_DST` (`SOL_IPV6`) when the first fails. An IPv6
/// connection is asked `SOL_IP` first too, and fails it.
const QUESTIONS: [(i32, u32); 2] = [(SOL_IP, 16), (SOL_IPV6, 28)];

/// Asks `questions` in turn, until one is answered.
fn original_dst(fd: RawFd, questions: &[(i32, u32)]) -> Result<SocketAddr, i32> {
    let mut buf = [0u8; 28];
    let mut last = 0;
    for (level, size) in questions {
        let mut len = *size;
        // SAFETY: buf holds 28 bytes, at least len.
        let rc = unsafe { getsockopt(fd, *level, SO_ORIGINAL_DST, buf.as_mut_ptr(), &mut len) };
        if rc == 0 {
            return parse_sockaddr(&buf).ok_or(-1);
        }
        last = errno();
    }
    Err(last)
}

/// ztunnel's upstream connect: bind the source to the client pod's address (transparent, as
/// under TPROXY), then connect to the original destination. Returns the local address the
/// kernel used.
fn upstream(client: IpAddr, dst: SocketAddr) -> Result<(SocketAddr, TcpStream), i32> {
    let domain = if dst.is_ipv4() { AF_INET } else { AF_INET6 };
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(errno());
        }
        let one: i32 = 1;
        let (level, opt) = if dst.is_ipv4() {
            (SOL_IP, IP_TRANSPARENT)
        } else {
            (SOL_IPV6, IPV6_TRANSPARENT)
        };
        setsockopt(fd, level, opt, &one as *const i32 as *const u8, 4);
        let src = sockaddr(SocketAddr::new(client, 0));
        if bind(fd, src.as_ptr(), src.len() as u32) != 0 {
            let e = errno();
            close(fd);
            return Err(e);
        }
        let to = sockaddr(dst);
        if connect(fd, to.as_ptr(), to.len() as u32) != 0 {
            let e = errno();
            close(fd);
            return Err(e);
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = stream.local_addr().map_err(|e| errno_of(&e))?;
        Ok((local, stream))
    }
}

/// Echoes one byte, then waits for the client to close first (so that TIME_WAIT lands on the
/// client's side, as with a client that closes first against ztunnel).
fn echo_one(stream: &mut TcpStream) {
    let mut byte = [0u8; 1];
    if stream.read_exact(&mut byte).is_ok() && stream.write_all(&byte).is_ok() {
        let _ = stream.read(&mut byte);
    }
}

/// Binds `addr`, or says why on a `fatal` line and exits.
fn listen(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| {
        say(&format!("fatal bind {addr} errno={}", errno_of(&e)));
        std::process::exit(1);
    })
}

/// The start of an `accept` line: where the connection was accepted, and from whom.
fn accept_line(stream: &TcpStream) -> String {
    let shown = |a: std::io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    format!(
        "accept local={} peer={}",
        shown(stream.local_addr()),
        shown(stream.peer_addr())
    )
}

/// ztunnel's questions about an accepted connection.
fn ask_original_dst(stream: &TcpStream) -> Result<SocketAddr, i32> {
    original_dst(stream.as_raw_fd(), &QUESTIONS)
}

/// A ztunnel that is slow to ask: on its (one) listener it accepts `n` connections, holding
/// them, and only then asks each its original destination, in accept order. With
/// `sol_ip_only`, it asks only the first question (so that a test can look at the table
/// between ztunnel's two questions); with `twice`, it asks both questions once more after
/// the first answer, and reports the first.
fn serve_deferred(listens: Vec<SocketAddr>, n: usize, sol_ip_only: bool, twice: bool) {
    let listener = listen(listens[0]);
    let questions = if sol_ip_only {
        &QUESTIONS[..1]
    } else {
        &QUESTIONS[..]
    };
    say("ready");
    loop {
        let held: Vec<TcpStream> = listener.incoming().take(n).flatten().collect();
        for stream in &held {
            let answer = match original_dst(stream.as_raw_fd(), questions) {
                Ok(dst) => format!("orig={dst}"),
                Err(e) => format!("orig-errno={e}"),
            };
            if twice {
                let _ = original_dst(stream.as_raw_fd(), questions);
            }
            say(&format!("{} {answer}", accept_line(stream)));
        }
    }
}

fn serve(listens: Vec<SocketAddr>, orig: bool, up: bool) {
    let listeners: Vec<TcpListener> = listens.into_iter().map(listen).collect();
    say("ready");
    let mut threads = Vec::new();
    for listener in listeners {
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                std::thread::spawn(move || {
                    let mut line = accept_line(&stream);
                    let mut upstream_stream = None;
                    if orig {
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
                    }
                    say(&line);
                    if let Some(mut s) = upstream_stream {
                        let _ = s.write_all(b"u");
                        let mut b = [0u8; 1];
                        let _ = s.read_exact(&mut b);
                    }
                    echo_one(&mut stream);
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}

/// How a client connection goes after the connect.
#[derive(Clone, Copy)]
struct ClientStyle {
    /// Write a byte and wait for its echo (else close right after the connect).
    echo: bool,
    /// Close with a reset (SO_LINGER 0): neither side keeps the 4-tuple in TIME_WAIT, so the
    /// next connection may use it again at once.
    rst: bool,
}

fn connect_once(
    to: SocketAddr,
    bind_addr: Option<SocketAddr>,
    style: ClientStyle,
) -> Result<(SocketAddr, SocketAddr), (&'static str, i32)> {
    let mut stream = match bind_addr {
        None => TcpStream::connect(to).map_err(|e| ("connect", errno_of(&e)))?,
        Some(src) => {
            let domain = if to.is_ipv4() { AF_INET } else { AF_INET6 };
            // SAFETY: plain syscalls on a descriptor this function owns.
            unsafe {
                let fd = socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err(("socket", errno()));
                }
                let src = sockaddr(src);
                if bind(fd, src.as_ptr(), src.len() as u32) != 0 {
                    let e = errno();
                    close(fd);
                    return Err(("bind", e));
                }
                let dst = sockaddr(to);
                if connect(fd, dst.as_ptr(), dst.len() as u32) != 0 {
                    let e = errno();
                    close(fd);
                    return Err(("connect", e));
                }
                TcpStream::from_raw_fd(fd)
            }
        }
    };
    let local = stream.local_addr().map_err(|e| ("io", errno_of(&e)))?;
    let peer = stream.peer_addr().map_err(|e| ("io", errno_of(&e)))?;
    if style.echo {
        stream.write_all(b"x").map_err(|e| ("io", errno_of(&e)))?;
        let mut b = [0u8; 1];
        stream
            .read_exact(&mut b)
            .map_err(|e| ("io", errno_of(&e)))?;
    }
    if style.rst {
        let linger: [i32; 2] = [1, 0];
        // SAFETY: an 8-byte struct linger for a descriptor the stream owns.
        unsafe {
            setsockopt(
                stream.as_raw_fd(),
                SOL_SOCKET,
                SO_LINGER,
                linger.as_ptr() as *const u8,
                8,
            );
        }
    }
    // The client closes first (as the benchmark of the tuple space requires).
    drop(stream);
    Ok((local, peer))
}

fn udp_ask(
    to: SocketAddr,
    connected: bool,
) -> Result<(SocketAddr, SocketAddr), (&'static str, i32)> {
    let socket = std::net::UdpSocket::bind(match to {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })
    .map_err(|e| ("socket", errno_of(&e)))?;
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .map_err(|e| ("socket", errno_of(&e)))?;
    if connected {
        socket.connect(to).map_err(|e| ("connect", errno_of(&e)))?;
        socket.send(b"q").map_err(|e| ("send", errno_of(&e)))?;
    } else {
        socket
            .send_to(b"q", to)
            .map_err(|e| ("send", errno_of(&e)))?;
    }
    let mut buf = [0u8; 64];
    let (_, from) = socket
        .recv_from(&mut buf)
        .map_err(|e| ("recv", errno_of(&e)))?;
    let local = socket.local_addr().map_err(|e| ("io", errno_of(&e)))?;
    Ok((local, from))
}

fn udp_echo(listens: Vec<SocketAddr>) {
    let mut threads = Vec::new();
    for addr in listens {
        let socket = match std::net::UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                say(&format!("fatal bind {addr}: {e}"));
                std::process::exit(1);
            }
        };
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let local = socket.local_addr().expect("bound");
                say(&format!("udp local={local} peer={from}"));
                let _ = socket.send_to(&buf[..n], from);
            }
        }));
    }
    say("ready");
    for t in threads {
        let _ = t.join();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    let mut listens = Vec::new();
    let mut to = Vec::new();
    let mut count = 1u64;
    let mut binds: Vec<SocketAddr> = Vec::new();
    let mut ask_after = 0usize;
    let mut style = ClientStyle {
        echo: true,
        rst: false,
    };
    let (mut orig, mut up, mut latency, mut sol_ip_only) = (false, false, false, false);
    let mut twice = false;
    let mut connected = false;
    let (mut zds, mut nacks, mut no_ack, mut hello_version) =
        (String::new(), Vec::new(), false, 1u64);
    let mut inpod_style = InPodStyle {
        pass_through: false,
        reconnect: false,
    };
    let mut no_echo = false;
    let mut i = 1;
    while i < args.len() {
        // Switches: no value follows.
        let switch = match args[i].as_str() {
            "--no-ack" => Some(&mut no_ack),
            "--pass-through" => Some(&mut inpod_style.pass_through),
            "--reconnect" => Some(&mut inpod_style.reconnect),
            "--no-echo" => Some(&mut no_echo),
            "--rst" => Some(&mut style.rst),
            "--orig-dst" => Some(&mut orig),
            "--ask-twice" => Some(&mut twice),
            "--sol-ip-only" => Some(&mut sol_ip_only),
            "--upstream" => Some(&mut up),
            "--connected" => Some(&mut connected),
            "--latency" => Some(&mut latency),
            _ => None,
        };
        if let Some(on) = switch {
            *on = true;
            i += 1;
            continue;
        }
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--listen" => listens.push(value().parse().expect("--listen ADDR:PORT")),
            "--to" => to.push(value().parse::<SocketAddr>().expect("--to ADDR:PORT")),
            "--count" => count = value().parse().expect("--count N"),
            // IP (any port) or IP:PORT; several are used round-robin, like --to.
            "--bind" => binds.push(value().parse::<SocketAddr>().unwrap_or_else(|_| {
                SocketAddr::new(value().parse().expect("--bind IP or IP:PORT"), 0)
            })),
            "--ask-after" => ask_after = value().parse().expect("--ask-after N"),
            "--zds" => zds = value(),
            "--hello-version" => hello_version = value().parse().expect("--hello-version N"),
            "--nack" => {
                let v = value();
                let (uid, n) = v.rsplit_once(':').expect("--nack UID:N");
                nacks.push((uid.to_string(), n.parse().expect("--nack UID:N")));
            }
            other => panic!("zbt-net: unknown argument {other}"),
        }
        i += 2;
    }
    style.echo = !no_echo;
    match mode.as_str() {
        "serve" if ask_after > 0 => serve_deferred(listens, ask_after, sol_ip_only, twice),
        "serve" => serve(listens, orig, up),
        // A process that only exists (so that its cgroup is live), until killed.
        "sleep" => {
            say("ready");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        "connect" => {
            // Several destinations are used round-robin (the tuple-space benchmark).
            for n in 0..count {
                let dst = to[(n as usize) % to.len()];
                let start = Instant::now();
                let bind = (!binds.is_empty()).then(|| binds[(n as usize) % binds.len()]);
                let result = connect_once(dst, bind, style);
                let took = start.elapsed().as_nanos();
                match result {
                    Ok(_) if latency => say(&format!("latency-ns={took}")),
                    Ok((local, peer)) => say(&format!("ok local={local} peer={peer}")),
                    Err((stage, e)) => say(&format!("err stage={stage} errno={e} n={n}")),
                }
            }
            say("done");
        }
        // A UDP connect (as a DNS resolver makes): the hooks must leave it alone.
        "udp-connect" => {
            let result = std::net::UdpSocket::bind(match to[0] {
                SocketAddr::V4(_) => "0.0.0.0:0",
                SocketAddr::V6(_) => "[::]:0",
            })
            .and_then(|socket| {
                socket.connect(to[0])?;
                Ok((socket.local_addr()?, socket.peer_addr()?))
            });
            match result {
                Ok((local, peer)) => say(&format!("ok local={local} peer={peer}")),
                Err(e) => say(&format!("err stage=connect errno={} n=0", errno_of(&e))),
            }
            say("done");
        }
        // A DNS-like question over UDP: one datagram to `--to` (sent with its address, or on
        // a connected socket with --connected), then the reply's source as recvfrom gives it.
        "udp-ask" => {
            match udp_ask(to[0], connected) {
                Ok((local, from)) => say(&format!("ok local={local} peer={from}")),
                Err((stage, e)) => say(&format!("err stage={stage} errno={e} n=0")),
            }
            say("done");
        }
        // A UDP server (ztunnel's DNS proxy, a DNS server): answers each datagram with one,
        // and reports where it came from.
        "udp-echo" => udp_echo(listens),
        "inpod-ztunnel" => inpod_ztunnel(&zds, nacks, no_ack, inpod_style, hello_version),
        _ => {
            eprintln!(
                "usage: zbt-net serve|connect|udp-connect|udp-ask|udp-echo|sleep|inpod-ztunnel ..."
            );
            std::process::exit(2);
        }
    }
}
