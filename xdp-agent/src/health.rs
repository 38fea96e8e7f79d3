//! The health endpoint (`--health`): a minimal HTTP/1.1 server for
//! Kubernetes' probes, one request per connection.
//!
//! - `GET /healthz`: 200 `ok` while the agent's runtime answers (liveness;
//!   it is served by a task of that runtime).
//! - `GET /readyz`: 200 `ok` when the kernel says the program is attached to
//!   every `--iface` and the maps answer; 503 with the first reason it is
//!   not, in one line.
//! - Any other path 404, another method on these paths 405; a request that
//!   is malformed 400. A request head over [`MAX_REQUEST_BYTES`] or not done
//!   within [`REQUEST_DEADLINE`] is closed unanswered.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

use crate::state::AgentState;

/// The longest request head (request line and headers) read; probes send
/// about a hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// How long a connection may take to send its request and read the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);

/// Connections served at once; more are closed at once, so that slow
/// clients cannot hold an unbounded number of tasks.
const MAX_CONNECTIONS: usize = 32;

/// The agent's state once it has started; until then `/readyz` answers 503.
pub type Started = Arc<OnceLock<Arc<AgentState>>>;

/// Binds the health endpoint: a busy port fails the start with one line.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot serve health checks on {address}"))
}

/// Serves health checks on `listener` in a task, until it is aborted.
pub fn spawn(listener: TcpListener, started: Started) -> JoinHandle<()> {
    tokio::spawn(serve(listener, started))
}

async fn serve(listener: TcpListener, started: Started) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                warn!(%error, "cannot accept a health-check connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%from, "too many health-check connections; closed");
            continue;
        };
        let started = Arc::clone(&started);
        tokio::spawn(async move {
            let readiness = || match started.get() {
                Some(state) => state.readiness(),
                None => Err("starting".to_owned()),
            };
            if let Err(error) = answer(stream, readiness, REQUEST_DEADLINE).await {
                debug!(%from, %error, "health-check connection closed unanswered");
            }
            drop(slot);
        });
    }
}

/// Why a connection was closed unanswered.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The request head is longer than [`MAX_REQUEST_BYTES`].
    #[error("the request is longer than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    /// The client closed the connection before the end of its request head.
    #[error("the request ended early")]
    Truncated,
    /// The request was not read and answered within the deadline.
    #[error("the request took longer than {0:?}")]
    Slow(Duration),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request from `stream` and answers it, all within `deadline`;
/// `readiness` is asked only for `/readyz`.
async fn answer<S>(
    mut stream: S,
    readiness: impl FnOnce() -> Result<(), String>,
    deadline: Duration,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(deadline, async {
        let head = read_head(&mut stream, MAX_REQUEST_BYTES).await?;
        let response = respond(&head, readiness);
        trace!(status = response.status, "health check answered");
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await?;
        Ok(())
    })
    .await
    .map_err(|_| ConnectionError::Slow(deadline))?
}

/// Reads up to the blank line that ends a request head (RFC 9112 section
/// 2.1), at most `limit` bytes. A body, which no probe sends, is not read.
async fn read_head(
    reader: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> Result<Vec<u8>, ConnectionError> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let read = reader.read(&mut chunk).await?;
        if read == 0 {
            return Err(ConnectionError::Truncated);
        }
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = find_blank_line(&head[searched_from..]) {
            let end = searched_from + end;
            if end > limit {
                return Err(ConnectionError::TooLarge);
            }
            head.truncate(end);
            return Ok(head);
        }
        if head.len() > limit {
            return Err(ConnectionError::TooLarge);
        }
    }
}

/// Where the first `\r\n\r\n` of `bytes` ends.
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// A request line (RFC 9112 section 3), as far as routing needs it.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    /// The path, without a query.
    path: &'a str,
}

/// Parses the request line of `head`; the headers are not needed.
fn parse(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let (line, _headers) = head.split_once("\r\n")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let valid_method = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !valid_method || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some(Request { method, path })
}

/// An answer, always closing the connection.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let allow = if self.status == 405 {
            "Allow: GET\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nCache-Control: no-store\r\n{allow}Connection: close\r\n\r\n{}",
            self.status,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// The answer to the request `head`.
fn respond(head: &[u8], readiness: impl FnOnce() -> Result<(), String>) -> Response {
    let Some(request) = parse(head) else {
        return Response::new(400, "bad request");
    };
    let readyz = match request.path {
        "/healthz" => false,
        "/readyz" => true,
        _ => return Response::new(404, "not found"),
    };
    if request.method != "GET" {
        return Response::new(405, "method not allowed");
    }
    if !readyz {
        return Response::new(200, "ok");
    }
    match readiness() {
        Ok(()) => Response::new(200, "ok"),
        Err(reason) => Response::new(503, one_line(&reason)),
    }
}

/// `reason` on one line, so that a probe's log shows all of it.
fn one_line(reason: &str) -> String {
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {

    use tokio::io::duplex;

    use super::*;

    fn ready() -> Result<(), String> {
        Ok(())
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: agent\r\nUser-Agent: kube-probe/1.31\r\n\r\n")
    }

    #[test]
    fn request_lines_parse() {
        assert_eq!(
            parse(get("/readyz?verbose").as_bytes()),
            Some(Request {
                method: "GET",
                path: "/readyz"
            })
        );
        assert_eq!(
            parse(b"POST /healthz HTTP/1.0\r\n\r\n").map(|r| r.method),
            Some("POST")
        );
        for bad in [
            &b"GET /healthz\r\n\r\n"[..],
            b"GET /healthz HTTP/2\r\n\r\n",
            b"GET healthz HTTP/1.1\r\n\r\n",
            b"GET  /healthz HTTP/1.1\r\n\r\n",
            b"get /healthz HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1 extra\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn probes_are_routed() {
        let never = || -> Result<(), String> { panic!("readiness asked for another path") };
        assert_eq!(
            respond(get("/healthz").as_bytes(), never),
            Response::new(200, "ok")
        );
        assert_eq!(
            respond(get("/readyz").as_bytes(), ready),
            Response::new(200, "ok")
        );
        assert_eq!(
            respond(get("/readyz").as_bytes(), || Err(
                "x0: the XDP program\nis not attached".into()
            )),
            Response::new(503, "x0: the XDP program is not attached")
        );
        assert_eq!(respond(get("/metrics").as_bytes(), never).status, 404);
        assert_eq!(respond(get("/").as_bytes(), never).status, 404);
        assert_eq!(
            respond(b"DELETE /readyz HTTP/1.1\r\n\r\n", never).status,
            405
        );
        assert_eq!(
            respond(b"HEAD /healthz HTTP/1.1\r\n\r\n", never).status,
            405
        );
        assert_eq!(respond(b"nonsense\r\n\r\n", never).status, 400);
    }

    #[test]
    fn responses_close_and_state_their_length() {
        let bytes = Response::new(405, "method not allowed").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("\r\nAllow: GET\r\n"));
        assert!(text.contains("\r\nContent-Length: 18\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n\r\nmethod not allowed"));
    }

    /// Sends `request` to [`answer`] over a pipe; the response, or why the
    /// connection was closed.
    async fn exchange(request: Vec<u8>, deadline: Duration) -> Result<String, String> {
        let (mut client, server) = duplex(64 * 1024);
        let served = tokio::spawn(answer(server, ready, deadline));
        client.write_all(&request).await.unwrap();
        let outcome = served.await.unwrap();
        let mut response = String::new();
        let _ = client.read_to_string(&mut response).await;
        outcome
            .map(|()| response)
            .map_err(|error| error.to_string())
    }

    #[tokio::test]
    async fn a_request_is_answered_and_the_connection_closed() {
        let response = exchange(get("/readyz").into_bytes(), REQUEST_DEADLINE)
            .await
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");
    }

    #[tokio::test]
    async fn long_requests_are_closed_unanswered() {
        let mut request = b"GET /healthz HTTP/1.1\r\n".to_vec();
        request.extend(b"X-Padding: ".iter().chain(&[b'a'; MAX_REQUEST_BYTES]));
        request.extend(b"\r\n\r\n");
        let error = exchange(request, REQUEST_DEADLINE).await.unwrap_err();
        assert!(error.contains("longer than 4096 bytes"), "{error}");
    }

    #[tokio::test]
    async fn slow_and_truncated_requests_are_closed_unanswered() {
        let unfinished = b"GET /healthz HTTP/1.1\r\nHost: agent\r\n".to_vec();
        let error = exchange(unfinished, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(error.contains("took longer"), "{error}");

        let (client, server) = duplex(1024);
        drop(client);
        let outcome = answer(server, ready, REQUEST_DEADLINE).await;
        assert!(matches!(outcome, Err(ConnectionError::Truncated)));
    }

    #[tokio::test]
    async fn a_head_split_across_reads_is_found() {
        let (mut client, mut server) = duplex(1024);
        let reader = tokio::spawn(async move { read_head(&mut server, MAX_REQUEST_BYTES).await });
        for piece in [&b"GET /healthz HTTP/1.1\r"[..], b"\n\r", b"\n"] {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let head = reader.await.unwrap().unwrap();
        assert_eq!(head, b"GET /healthz HTTP/1.1\r\n\r\n");
    }
}
