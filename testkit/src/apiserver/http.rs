//! The HTTP/1.1 plumbing: accept connections, read one request each, write the answer (a JSON
//! body, or a watch as a chunked stream) and close (`Connection: close`: simple, and the client
//! opens a new connection for the next request, which it must be able to do anyway).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;

use super::api::{self, Response, WatchNext};
use super::state::Shared;
use super::RecordedRequest;

pub(super) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.lock().stopping {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("fake-apiserver-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &shared) {
                    // Clients hang up mid-stream; that is their right, not a server failure.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                    ) {
                        eprintln!("fake-apiserver: connection error: {e}");
                    }
                }
            });
    }
}

/// Reads one HTTP/1.1 request and answers it.
fn serve(stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // a connect without a request (the acceptor's wake-up)
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(());
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), Vec::new()),
    };
    let request = RecordedRequest {
        method,
        path,
        query,
        body,
    };
    let mut out = stream;
    match api::handle(&request, shared) {
        Response::Json { code, body } => respond(&mut out, code, &body),
        Response::Watch(mut watch) => {
            out.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            )?;
            loop {
                match watch.next() {
                    WatchNext::Lines(lines) => {
                        for line in &lines {
                            write_chunk(&mut out, line)?;
                        }
                        out.flush()?;
                    }
                    WatchNext::End => {
                        out.write_all(b"0\r\n\r\n")?;
                        return out.flush();
                    }
                    WatchNext::Cut => {
                        let _ = out.shutdown(Shutdown::Both);
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn write_chunk(out: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(out, "{:x}\r\n{data}\r\n", data.len())
}

/// Decodes an `application/x-www-form-urlencoded` query.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("fieldSelector=spec.nodeName%3Dnode-a&watch=true&x=a+b"),
            vec![
                ("fieldSelector".into(), "spec.nodeName=node-a".into()),
                ("watch".into(), "true".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
