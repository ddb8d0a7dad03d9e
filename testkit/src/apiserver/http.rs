//! The HTTP/1.1 plumbing, on hyper: a tokio runtime on a thread of its own serves each
//! connection, turns a request into a [`RecordedRequest`] for the API, and writes the answer (a
//! JSON body, or a watch as a chunked stream). Every response closes its connection
//! (`Connection: close`): simple, and the client opens a new one for the next request, which
//! it must be able to do anyway.

use std::io;
use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::api::{self, Response, WatchNext, WatchStream};
use super::state::Shared;
use super::RecordedRequest;

/// Serves connections from `listener` until `stop` fires (or its sender is dropped).
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: oneshot::Receiver<()>) {
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, shared.clone()));
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                // Clients hang up mid-stream, which is their right, and a cut watch ends its
                // connection on purpose (an aborted body): neither is a server failure.
                if !(e.is_incomplete_message() || e.is_closed() || e.is_user() || e.is_canceled()) {
                    eprintln!("fake-apiserver: connection error: {e}");
                }
            }
        });
    }
}

type Body = BoxBody<Bytes, io::Error>;

/// Answers one request.
async fn answer(
    req: hyper::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Body>, hyper::Error> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let body = req.into_body().collect().await?.to_bytes().to_vec();
    let request = RecordedRequest {
        method,
        path,
        query,
        body,
    };
    let response = hyper::Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .header(CONNECTION, "close");
    let response = match api::handle(&request, &shared) {
        Response::Json { code, body } => response
            .status(code)
            .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed()),
        Response::Watch(watch) => response.status(200).body(stream(watch).boxed()),
    };
    Ok(response.expect("a status code and headers of the API's"))
}

/// A watch's events as a streamed body, one line each.
fn stream(mut watch: WatchStream) -> WatchBody {
    let (tx, lines) = mpsc::channel(16);
    // A watch waits for changes on a lock and a condition variable: off the runtime's threads.
    tokio::task::spawn_blocking(move || loop {
        let next = match watch.next() {
            WatchNext::Lines(lines) => lines,
            WatchNext::End => return,
            WatchNext::Cut => {
                let _ = tx.blocking_send(Err(io::Error::other("watch cut")));
                return;
            }
        };
        for line in next {
            if tx.blocking_send(Ok(Bytes::from(line + "\n"))).is_err() {
                return; // the client hung up
            }
        }
    });
    WatchBody { lines, cut: None }
}

/// The body of a watch: its lines, then the end, or when the watch is cut an error, on which
/// hyper closes the connection without the final chunk, as a dropped watch looks to a client.
struct WatchBody {
    lines: mpsc::Receiver<io::Result<Bytes>>,
    /// The cut, held back for one poll: hyper flushes what it wrote when the body is pending,
    /// and would drop it on an error straight after the last line.
    cut: Option<io::Error>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        if let Some(cut) = self.cut.take() {
            return Poll::Ready(Some(Err(cut)));
        }
        match self.lines.poll_recv(cx) {
            Poll::Ready(Some(Ok(line))) => Poll::Ready(Some(Ok(Frame::data(line)))),
            Poll::Ready(Some(Err(cut))) => {
                self.cut = Some(cut);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
