//! The admin HTTP server (`--admin`): liveness and readiness for Kubernetes probes, and the
//! drain a preStop hook starts (`turn-control drain`). A minimal HTTP/1.1 reader: one request
//! per connection, its head at most [`MAX_REQUEST`] bytes read within [`READ_TIMEOUT`], any
//! body ignored, the connection closed after the answer.
//!
//! - `GET /healthz`: 200 `ok` while every event-loop thread published its report within
//!   [`STUCK_AFTER`], else 503 naming the first thread that did not.
//! - `GET /readyz`: 200 while the listeners are bound and the relay does not drain, else 503
//!   with the reason (`starting`, `draining`). The body says whether the xdp-agent link is
//!   up; readiness does not depend on it (user space relays without it).
//! - `POST /drain`: starts draining (idempotent), 202 `{"draining":true,"allocations":N}`;
//!   `GET /drain`: the same JSON with 200.
//!
//! Anything else is 404, another method 405.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use turn_control_core::QuotaLedger;

use crate::threads::ReportSlot;

/// The longest request head read.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// An event-loop thread that has not published for this long is stuck (they publish every
/// second).
pub const STUCK_AFTER: Duration = Duration::from_secs(5);
/// Connections served at once; further ones are closed at once.
const CONNECTIONS: usize = 64;

/// What the admin server reports and what it asks the main thread for. Shared by the main
/// thread and the server's tasks.
#[derive(Debug)]
pub struct Status {
    reports: Vec<ReportSlot>,
    quotas: Arc<QuotaLedger>,
    agent_configured: bool,
    ready: AtomicBool,
    draining: AtomicBool,
    drain_requested: Notify,
    /// When the threads were started: one that has not published yet counts from here.
    created: Instant,
}

impl Status {
    /// The status of the event-loop threads publishing to `reports`, whose allocations
    /// `quotas` counts.
    pub fn new(reports: Vec<ReportSlot>, quotas: Arc<QuotaLedger>, agent_configured: bool) -> Self {
        Self {
            reports,
            quotas,
            agent_configured,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drain_requested: Notify::new(),
            created: Instant::now(),
        }
    }

    /// [`Status::new`] of threads just started on listeners bound before: ready.
    pub fn started(reports: Vec<ReportSlot>, quotas: Arc<QuotaLedger>, agent: bool) -> Arc<Self> {
        let status = Self::new(reports, quotas, agent);
        status.set_ready();
        Arc::new(status)
    }

    /// The listeners are bound and the threads run.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Marks the relay draining; whether it was not before. The main thread tells the
    /// event-loop threads ([`Status::drain_requested`]).
    pub fn start_drain(&self) -> bool {
        let started = !self.draining.swap(true, Ordering::Relaxed);
        if started {
            self.drain_requested.notify_one();
        }
        started
    }

    /// Whether the relay drains.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the relay takes new allocations: bound, started and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_draining()
    }

    /// Allocations alive, over every thread.
    pub fn allocations(&self) -> u32 {
        self.quotas.total()
    }

    /// Completes when POST /drain started the drain.
    pub async fn drain_requested(&self) {
        self.drain_requested.notified().await;
    }

    /// The first event-loop thread that has not published within [`STUCK_AFTER`], and why.
    fn stuck_thread(&self, now: Instant) -> Option<String> {
        self.reports.iter().enumerate().find_map(|(index, slot)| {
            let published = daemon::lock(slot).published;
            let since = now.saturating_duration_since(published.unwrap_or(self.created));
            match published {
                _ if since <= STUCK_AFTER => None,
                None => Some(format!("event-loop thread {index} has not started")),
                Some(_) => Some(format!(
                    "event-loop thread {index} stuck: last tick {} s ago",
                    since.as_secs()
                )),
            }
        })
    }

    /// The state of the link to the xdp-agent, for /readyz.
    fn agent(&self) -> &'static str {
        if !self.agent_configured {
            "no agent (user-space relaying)"
        } else if crate::threads::total(&self.reports).agent_connected {
            "agent connected"
        } else {
            "agent not connected (user-space relaying)"
        }
    }

    fn drain_json(&self) -> String {
        format!(
            "{{\"draining\":{},\"allocations\":{}}}\n",
            self.is_draining(),
            self.allocations()
        )
    }
}

/// Binds the admin listener; a failure is a start error naming the address.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("admin listener {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("admin listener {addr}"))?;
    Ok(listener)
}

/// Serves `listener` until the process ends. Must run inside the runtime.
pub async fn serve(listener: std::net::TcpListener, status: Arc<Status>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin listener");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Beyond the limit the connection closes unanswered.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            answer(stream, &status).await;
            drop(slot);
        });
    }
}

/// An answer: status code, reason phrase, body (text unless it starts with `{`).
#[derive(Debug, PartialEq, Eq)]
struct Response {
    code: u16,
    body: String,
}

impl Response {
    fn new(code: u16, body: impl Into<String>) -> Self {
        Self {
            code,
            body: body.into(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.code {
            200 => "OK",
            202 => "Accepted",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Bad Request",
        };
        let kind = if self.body.starts_with('{') {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.code,
            self.body.len()
        );
        if self.code == 405 {
            head.push_str("Allow: GET, POST\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

async fn answer(mut stream: TcpStream, status: &Status) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::new(408, "request too slow\n"),
        Ok(Err(HeadError::TooLarge)) => Response::new(431, "request too large\n"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Ok(head)) => route(&head, status),
    };
    let write = async {
        stream.write_all(&response.to_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(error) = tokio::time::timeout(READ_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
    {
        tracing::debug!(%error, "admin answer not sent");
    }
}

enum HeadError {
    TooLarge,
    Closed,
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<String, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
    }
}

/// The answer to the request whose head is `head`.
fn route(head: &str, status: &Status) -> Response {
    let mut words = head.lines().next().unwrap_or_default().split(' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Response::new(400, "bad request line\n");
    };
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/healthz") => match status.stuck_thread(Instant::now()) {
            None => Response::new(200, "ok\n"),
            Some(reason) => Response::new(503, format!("{reason}\n")),
        },
        ("GET", "/readyz") => {
            let agent = status.agent();
            if status.is_draining() {
                Response::new(503, format!("draining; {agent}\n"))
            } else if !status.is_ready() {
                Response::new(503, format!("starting; {agent}\n"))
            } else {
                Response::new(200, format!("ready; {agent}\n"))
            }
        }
        ("POST", "/drain") => {
            if status.start_drain() {
                tracing::info!(
                    allocations = status.allocations(),
                    "drain requested (POST /drain)"
                );
            }
            Response::new(202, status.drain_json())
        }
        ("GET", "/drain") => Response::new(200, status.drain_json()),
        (_, "/healthz" | "/readyz" | "/drain") => Response::new(405, "method not allowed\n"),
        _ => Response::new(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::Report;

    fn status(threads: usize) -> Status {
        let reports = (0..threads).map(|_| ReportSlot::default()).collect();
        Status::new(reports, QuotaLedger::shared(), false)
    }

    fn publish(status: &Status, at: Instant) {
        for slot in &status.reports {
            *daemon::lock(slot) = Report {
                published: Some(at),
                ..Report::default()
            };
        }
    }

    fn get(status: &Status, line: &str) -> Response {
        route(&format!("{line}\r\nHost: x"), status)
    }

    #[test]
    fn health_names_a_thread_that_stopped_publishing() {
        let mut s = status(2);
        // Starting threads get a grace period.
        assert_eq!(get(&s, "GET /healthz HTTP/1.1").code, 200);
        s.created -= Duration::from_secs(10);
        let r = get(&s, "GET /healthz HTTP/1.1");
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "event-loop thread 0 has not started\n")
        );
        publish(&s, Instant::now());
        assert_eq!(get(&s, "GET /healthz HTTP/1.1"), Response::new(200, "ok\n"));
        *daemon::lock(&s.reports[1]) = Report {
            published: Some(Instant::now() - Duration::from_secs(10)),
            ..Report::default()
        };
        let r = get(&s, "GET /healthz?verbose HTTP/1.1");
        assert_eq!(r.code, 503);
        assert!(
            r.body.starts_with("event-loop thread 1 stuck"),
            "{}",
            r.body
        );
    }

    #[test]
    fn readiness_ends_with_the_drain_and_drain_is_idempotent() {
        let s = status(1);
        assert_eq!(get(&s, "GET /readyz HTTP/1.1").code, 503);
        s.set_ready();
        let r = get(&s, "GET /readyz HTTP/1.1");
        assert_eq!(
            (r.code, r.body.as_str()),
            (200, "ready; no agent (user-space relaying)\n")
        );
        let drain = r#"{"draining":true,"allocations":0}"#.to_owned() + "\n";
        assert_eq!(
            get(&s, "POST /drain HTTP/1.1"),
            Response::new(202, drain.clone())
        );
        assert_eq!(
            get(&s, "POST /drain HTTP/1.1"),
            Response::new(202, drain.clone())
        );
        assert_eq!(get(&s, "GET /drain HTTP/1.1"), Response::new(200, drain));
        let r = get(&s, "GET /readyz HTTP/1.1");
        assert_eq!(r.code, 503);
        assert!(r.body.starts_with("draining"), "{}", r.body);
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let s = status(1);
        assert_eq!(get(&s, "GET /metrics HTTP/1.1").code, 404);
        assert_eq!(get(&s, "DELETE /drain HTTP/1.1").code, 405);
        assert_eq!(get(&s, "POST /healthz HTTP/1.1").code, 405);
        assert_eq!(get(&s, "garbage").code, 400);
        assert!(!s.is_draining());
        let bytes = Response::new(405, "x").to_bytes();
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .contains("Allow: GET, POST\r\n")
        );
    }
}
