//! The HTTP side of the accounting webhook: the endpoint (an `http://` or `https://` URL),
//! a minimal HTTP/1.1 client that POSTs one body at a time over a kept-alive connection
//! (RFC 9112), what an answer means for the record, and the delay between attempts.
//!
//! `https://` runs the same client over rustls (the aws-lc-rs provider, as in
//! [`crate::tls`]) on the same TCP connection. The server's certificate must be valid for
//! the URL's host (a name, sent as SNI, or an IP address) and chain to a root of the
//! system's trust store, read by `rustls-native-certs`: like OpenSSL, that honours the
//! `SSL_CERT_FILE` (a PEM bundle) and `SSL_CERT_DIR` environment variables, which then
//! replace the system's store. A handshake or certificate failure is a failed delivery
//! like a refused connection: retried with backoff, its reason in the error.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Where the records go: an `http[s]://host[:port][/path]` URL, taken apart once at
/// start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://`: TLS over the TCP connection.
    tls: bool,
    /// The name or address to connect to (IPv6 without brackets).
    host: String,
    port: u16,
    /// The `Host` header (RFC 9110 §7.2): the URL's authority as written.
    authority: String,
    /// The request target (RFC 9112 §3.2.1, origin-form), at least `/`.
    path: String,
}

impl Endpoint {
    /// Parses `url`; the error is one line naming the URL and what is wrong with it.
    pub fn parse(url: &str) -> anyhow::Result<Endpoint> {
        let Some((scheme, rest)) = url.split_once("://") else {
            bail!("accounting webhook {url:?} is not a URL (expected http[s]://host[:port]/path)");
        };
        let tls = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            bail!("accounting webhook {url:?}: the scheme must be http:// or https://");
        };
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = match path {
            "" => "/".to_owned(),
            query if query.starts_with('?') => format!("/{query}"),
            path => path.to_owned(),
        };
        if authority.contains('@') {
            bail!("accounting webhook {url:?}: credentials in the URL are not supported");
        }
        let Some((host, port)) = split_host_port(authority, if tls { 443 } else { 80 }) else {
            bail!("accounting webhook {url:?}: bad host or port");
        };
        if tls && ServerName::try_from(host).is_err() {
            bail!("accounting webhook {url:?}: {host:?} is not a name a certificate can be for");
        }
        if path
            .bytes()
            .any(|byte| byte.is_ascii_control() || byte == b' ')
        {
            bail!("accounting webhook {url:?}: the path has spaces or control characters");
        }
        Ok(Endpoint {
            tls,
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to `default_port`.
fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        match after {
            "" => (host, None),
            after => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(port) => port.parse().ok().filter(|&port| port != 0)?,
    };
    (!host.is_empty() && !host.contains(['/', ' ', '[', ']'])).then_some((host, port))
}

/// What an answer means for the record it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the collector has it.
    Delivered,
    /// 400, 413 or 422: the collector will never take this body; sending it again cannot
    /// help and would hold up every record behind it.
    Rejected,
    /// Anything else (5xx, 429, 408, 401, redirects...): the collector may take it later.
    Retry,
}

impl Verdict {
    pub fn of(status: u16) -> Verdict {
        match status {
            200..=299 => Verdict::Delivered,
            400 | 413 | 422 => Verdict::Rejected,
            _ => Verdict::Retry,
        }
    }
}

/// The delay before the next attempt at the same record: from [`Backoff::INITIAL`]
/// doubling up to [`Backoff::MAX`], each delay drawn in its upper half so that daemons
/// that lost the same collector do not come back in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_millis(500);
    pub const MAX: Duration = Duration::from_secs(30);

    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The next delay before jitter, and steps the sequence.
    pub fn next_base(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        base
    }

    /// The next delay to wait: [`Backoff::next_base`] scaled by a random factor in [0.5, 1].
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next_base();
        base.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// Back to the first delay, after a record went through.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Backoff::INITIAL, Backoff::MAX)
    }
}

/// Longest status line plus headers accepted in an answer.
const MAX_HEAD: usize = 64 * 1024;

/// The roots an `https://` collector's certificate must chain to: the system's trust
/// store as `rustls-native-certs` reads it (or, when the `SSL_CERT_FILE` or `SSL_CERT_DIR`
/// environment variable is set, the certificates there instead), plus the PEM bundle
/// `extra` if given. The error is one line: `extra` unreadable, or no root at all.
pub fn trusted_roots(extra: Option<&Path>) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for error in &native.errors {
        tracing::warn!(%error, "some of the system's trusted TLS roots could not be read");
    }
    if let Some(path) = extra {
        let context = || format!("cannot read the CA bundle {}", path.display());
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(context)?;
        ensure!(
            !certificates.is_empty(),
            "{}: no certificate in it",
            context()
        );
        for certificate in certificates {
            roots.add(certificate).with_context(context)?;
        }
    }
    ensure!(
        !roots.is_empty(),
        "no trusted TLS roots for the accounting webhook ({}); install the system's CA \
         certificates or set SSL_CERT_FILE to a PEM bundle",
        native.errors.first().map_or(
            "the system's store is empty".to_owned(),
            ToString::to_string
        )
    );
    Ok(roots)
}

/// The TLS client side for `https://` collectors: TLS 1.3 or 1.2 with the aws-lc-rs
/// provider (the one the daemon's TLS listener uses), offering ALPN `http/1.1`.
fn client_config(roots: RootCertStore) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An HTTP/1.1 client for one endpoint, one request at a time, reusing its connection
/// while the server keeps it open (RFC 9112 §9.3).
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    /// For an `https://` endpoint.
    tls: Option<Arc<ClientConfig>>,
    connection: Option<Connection>,
}

impl Client {
    /// A client for `endpoint`; for `https://`, trusting [`trusted_roots`]`(extra_roots)`
    /// (read now: the error is one line).
    pub fn new(endpoint: Endpoint, extra_roots: Option<&Path>) -> anyhow::Result<Client> {
        let tls = if endpoint.tls {
            Some(client_config(trusted_roots(extra_roots)?)?)
        } else {
            None
        };
        Ok(Client {
            endpoint,
            tls,
            connection: None,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// POSTs `body` as `application/json` and returns the answer's status code. The whole
    /// exchange (connect, send, answer) takes at most `timeout`; any error closes the
    /// connection. A kept-alive connection the server closed while idle is retried at once
    /// on a new one: nothing was answered, so the server did not act on the body.
    pub fn post(&mut self, body: &[u8], timeout: Duration) -> io::Result<u16> {
        let deadline = Instant::now() + timeout;
        let reused = self.connection.is_some();
        match self.exchange(body, deadline) {
            Ok(status) => Ok(status),
            Err(failure) if reused && failure.closed_while_idle() => self
                .exchange(body, deadline)
                .map_err(|failure| failure.error),
            Err(failure) => Err(failure.error),
        }
    }

    fn exchange(&mut self, body: &[u8], deadline: Instant) -> Result<u16, Failure> {
        let mut received = 0;
        let result = self.try_exchange(body, deadline, &mut received);
        if !matches!(result, Ok((_, true))) {
            self.connection = None;
        }
        result
            .map(|(status, _)| status)
            .map_err(|error| Failure { error, received })
    }

    /// The status and whether the connection may carry the next request; `received` counts
    /// the bytes of the answer that arrived.
    fn try_exchange(
        &mut self,
        body: &[u8],
        deadline: Instant,
        received: &mut usize,
    ) -> io::Result<(u16, bool)> {
        let stream = match &mut self.connection {
            Some(stream) => stream,
            None => {
                let tcp = connect(&self.endpoint, deadline)?;
                let connection = match &self.tls {
                    None => Connection::Plain(tcp),
                    Some(config) => handshake(config, &self.endpoint, tcp, deadline)?,
                };
                self.connection.insert(connection)
            }
        };
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: keep-alive\r\nUser-Agent: turn-control/{}\r\n\r\n",
            self.endpoint.path,
            self.endpoint.authority,
            body.len(),
            env!("CARGO_PKG_VERSION"),
        )
        .into_bytes();
        request.extend_from_slice(body);
        stream
            .socket()
            .set_write_timeout(Some(remaining(deadline)?))?;
        stream.write_all(&request)?;
        // TLS: a write only queues what the socket did not take; this sends it or fails.
        stream.flush()?;
        let mut reader = ResponseReader {
            stream,
            buffer: Vec::new(),
            deadline,
            received,
        };
        reader.response()
    }
}

/// A failed exchange and how much of an answer had arrived.
struct Failure {
    error: io::Error,
    received: usize,
}

impl Failure {
    /// The server closed a kept-alive connection before this request: the write failed or
    /// the connection ended before any answer (a timeout is not that: the server may be
    /// busy with the body).
    fn closed_while_idle(&self) -> bool {
        self.received == 0
            && matches!(
                self.error.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            )
    }
}

fn connect(endpoint: &Endpoint, deadline: Instant) -> io::Result<TcpStream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for address in (endpoint.host.as_str(), endpoint.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, remaining(deadline)?) {
            Ok(stream) => {
                // Records are small and sent one at a time: do not hold them for Nagle.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// An open connection to the collector: plain TCP or TLS over it.
#[derive(Debug)]
enum Connection {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Connection {
    /// The TCP connection underneath, for its timeouts.
    fn socket(&self) -> &TcpStream {
        match self {
            Connection::Plain(stream) => stream,
            Connection::Tls(stream) => &stream.sock,
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.read(buffer),
            Connection::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Plain(stream) => stream.write(buffer),
            Connection::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Plain(stream) => stream.flush(),
            Connection::Tls(stream) => stream.flush(),
        }
    }
}

/// Runs the TLS handshake on `tcp`, within the deadline: SNI and the certificate's name
/// are the endpoint's host. A failure names its reason ("certificate not trusted"...).
fn handshake(
    config: &Arc<ClientConfig>,
    endpoint: &Endpoint,
    mut tcp: TcpStream,
    deadline: Instant,
) -> io::Result<Connection> {
    // Checked by `Endpoint::parse`.
    let name = ServerName::try_from(endpoint.host.clone())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut tls = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        let left = remaining(deadline)?;
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        tls.complete_io(&mut tcp)
            .map_err(|error| handshake_failed(error, &endpoint.host))?;
    }
    Ok(Connection::Tls(Box::new(StreamOwned::new(tls, tcp))))
}

/// `error` from a handshake with `host`, saying why in words an operator knows.
fn handshake_failed(error: io::Error, host: &str) -> io::Error {
    let kind = error.kind();
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        let reason = match kind {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                return io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time");
            }
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
            _ => error.to_string(),
        };
        return io::Error::new(kind, format!("TLS handshake with {host} failed: {reason}"));
    };
    let reason = match tls {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => "certificate not trusted".to_owned(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("certificate not valid for {host}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not yet valid".to_owned()
            }
            CertificateError::Revoked => "certificate revoked".to_owned(),
            _ => "certificate rejected".to_owned(),
        },
        rustls::Error::AlertReceived(alert) => format!("the server refused it ({alert:?})"),
        _ => "protocol error".to_owned(),
    };
    io::Error::new(
        kind,
        format!("TLS handshake with {host} failed: {reason} ({tls})"),
    )
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
    }
    Ok(left)
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed answer: {what}"),
    )
}

/// Reads one answer from the stream, all of it bounded by the deadline.
struct ResponseReader<'a> {
    stream: &'a mut Connection,
    /// Received and not yet consumed.
    buffer: Vec<u8>,
    deadline: Instant,
    /// Bytes read from the stream so far.
    received: &'a mut usize,
}

/// The parts of an answer's head that say how to read its body and the connection.
#[derive(Debug, Default, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
}

impl ResponseReader<'_> {
    /// Reads the answer through its body; interim 1xx answers (RFC 9110 §15.2) are skipped.
    fn response(&mut self) -> io::Result<(u16, bool)> {
        let head = loop {
            let head = self.head()?;
            if !(100..200).contains(&head.status) {
                break head;
            }
        };
        let delimited = if head.status == 204 || head.status == 304 {
            true
        } else if head.chunked {
            self.skip_chunked()?;
            true
        } else if let Some(length) = head.content_length {
            self.skip(length)?;
            true
        } else {
            // RFC 9112 §6.3: without a length the body runs to the end of the connection.
            self.skip_to_end()?;
            false
        };
        // Bytes past the answer were never asked for: do not read the next answer from them.
        let reusable = delimited && head.keep_alive && self.buffer.is_empty();
        Ok((head.status, reusable))
    }

    fn head(&mut self) -> io::Result<Head> {
        let end = loop {
            if let Some(at) = find(&self.buffer, b"\r\n\r\n") {
                break at;
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(malformed("head too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the end of the answer's head",
                ));
            }
        };
        let head: Vec<u8> = self.buffer.drain(..end + 4).collect();
        let text = std::str::from_utf8(&head).map_err(|_| malformed("head is not UTF-8"))?;
        parse_head(text)
    }

    fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line = self.line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| malformed("chunk size"))?;
            if size == 0 {
                // Trailer fields, up to the empty line (RFC 9112 §7.1.2).
                while !self.line()?.is_empty() {}
                return Ok(());
            }
            self.skip(size)?;
            if !self.line()?.is_empty() {
                return Err(malformed("chunk longer than its size"));
            }
        }
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = find(&self.buffer, b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..at + 2).take(at).collect();
                return String::from_utf8(line).map_err(|_| malformed("line is not UTF-8"));
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(malformed("line too long"));
            }
            self.fill_or_eof()?;
        }
    }

    fn skip(&mut self, mut length: u64) -> io::Result<()> {
        loop {
            let here = usize::try_from(length)
                .unwrap_or(usize::MAX)
                .min(self.buffer.len());
            self.buffer.drain(..here);
            length -= here as u64;
            if length == 0 {
                return Ok(());
            }
            self.fill_or_eof()?;
        }
    }

    fn skip_to_end(&mut self) -> io::Result<()> {
        loop {
            self.buffer.clear();
            match self.fill() {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // TLS: the server closed without close_notify. Only the status matters, and
                // the connection is not kept either way.
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(error) => return Err(error),
            }
        }
    }

    fn fill_or_eof(&mut self) -> io::Result<()> {
        if self.fill()? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the answer's body",
            ));
        }
        Ok(())
    }

    /// Reads what has arrived (waiting at most until the deadline); 0 at the end.
    fn fill(&mut self) -> io::Result<usize> {
        self.stream
            .socket()
            .set_read_timeout(Some(remaining(self.deadline)?))?;
        let mut chunk = [0_u8; 4096];
        let read = match self.stream.read(&mut chunk) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            other => other?,
        };
        self.buffer.extend_from_slice(&chunk[..read]);
        *self.received += read;
        Ok(read)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Parses a status line and header fields ending in an empty line (RFC 9112 §4, §5).
fn parse_head(text: &str) -> io::Result<Head> {
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().unwrap_or_default();
    let Some(minor) = version.strip_prefix("HTTP/1.") else {
        return Err(malformed("not an HTTP/1 status line"));
    };
    let status: u16 = status
        .parse()
        .ok()
        .filter(|status| (100..=999).contains(status))
        .ok_or_else(|| malformed("status code"))?;
    let mut head = Head {
        status,
        // RFC 9112 §9.3: HTTP/1.1 keeps the connection unless told to close it; 1.0 the reverse.
        keep_alive: minor != "0",
        ..Head::default()
    };
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed("header line"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value.parse().map_err(|_| malformed("Content-Length"))?;
            if head.content_length.is_some_and(|seen| seen != length) {
                return Err(malformed("two different Content-Length"));
            }
            head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !head.chunked {
                return Err(malformed("a transfer coding other than chunked"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::net::TcpListener;

    use super::*;

    /// Reads one request's head and body from `reader`; None at the end of the connection.
    fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        Some((head, body))
    }

    #[test]
    fn the_client_reads_chunked_and_sized_answers_and_reconnects_when_the_server_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        // First connection: a chunked answer, then a sized one with a body, then the server
        // closes while idle. Second connection: one answer with `Connection: close`.
        let answers: [&[&[u8]]; 2] = [
            &[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
                b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy",
            ],
            &[b"HTTP/1.1 422 No\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"],
        ];
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for answers in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                for answer in answers {
                    requests.push(read_request(&mut reader).unwrap());
                    (&stream).write_all(answer).unwrap();
                }
            }
            requests
        });
        let mut client = Client::new(Endpoint::parse(&url).unwrap(), None).unwrap();
        let timeout = Duration::from_secs(5);
        assert_eq!(client.post(b"{\"n\":1}", timeout).unwrap(), 200);
        assert_eq!(client.post(b"{\"n\":2}", timeout).unwrap(), 503);
        assert!(client.connection.is_some(), "kept alive");
        assert_eq!(client.post(b"{\"n\":3}", timeout).unwrap(), 422);
        assert!(client.connection.is_none(), "closed as the server asked");
        let requests = server.join().unwrap();
        let bodies: Vec<&[u8]> = requests.iter().map(|(_, body)| body.as_slice()).collect();
        assert_eq!(bodies, [&b"{\"n\":1}"[..], b"{\"n\":2}", b"{\"n\":3}"]);
        let (head, _) = &requests[0];
        assert!(head.starts_with("POST /in HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: application/json\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nHost: {}\r\n", &url[7..url.len() - 3])));
    }

    #[test]
    fn a_silent_server_times_out_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let mut client = Client::new(Endpoint::parse(&url).unwrap(), None).unwrap();
        let started = Instant::now();
        let error = client.post(b"{}", Duration::from_millis(200)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(client.connection.is_none());
    }

    #[test]
    fn endpoints_parse_and_errors_are_one_line() {
        let endpoint = Endpoint::parse("http://collector.example:8080/usage?key=1").unwrap();
        assert_eq!(endpoint.host, "collector.example");
        assert_eq!(endpoint.port, 8080);
        assert_eq!(endpoint.authority, "collector.example:8080");
        assert_eq!(endpoint.path, "/usage?key=1");
        let endpoint = Endpoint::parse("HTTP://[::1]").unwrap();
        assert_eq!((endpoint.host.as_str(), endpoint.port), ("::1", 80));
        assert_eq!(endpoint.path, "/");
        assert_eq!(Endpoint::parse("http://h?x#frag").unwrap().path, "/?x");
        let endpoint = Endpoint::parse("HTTPS://collector.example/in").unwrap();
        assert!(endpoint.tls);
        assert_eq!(
            (endpoint.host.as_str(), endpoint.port),
            ("collector.example", 443)
        );
        assert_eq!(endpoint.to_string(), "https://collector.example/in");
        let endpoint = Endpoint::parse("https://[::1]:8443").unwrap();
        assert_eq!((endpoint.host.as_str(), endpoint.port), ("::1", 8443));
        assert!(!Endpoint::parse("http://h/").unwrap().tls);
        for bad in [
            "collector:80",
            "ftp://h/",
            "https://h!/",
            "https://-h-/",
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://[::1/",
            "http://user:pw@h/",
            "http://h/a b",
        ] {
            let error = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(
                error.contains(bad) && !error.contains('\n'),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn an_extra_ca_bundle_that_cannot_be_read_stops_the_start_in_one_line() {
        let https = || Endpoint::parse("https://collector.example/").unwrap();
        let dir = std::env::temp_dir().join(format!("turn-control-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        for (path, cause) in [(&missing, "No such file"), (&garbage, "no certificate")] {
            let error = Client::new(https(), Some(path)).unwrap_err();
            let message = format!("{error:#}");
            assert!(
                message.contains(&*path.to_string_lossy())
                    && message.contains(cause)
                    && !message.contains('\n'),
                "{message}"
            );
        }
        // Plain http has no use for roots and does not read them.
        assert!(Client::new(Endpoint::parse("http://h/").unwrap(), Some(&missing)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_400_413_and_422_reject_a_record_for_good() {
        assert_eq!(Verdict::of(200), Verdict::Delivered);
        assert_eq!(Verdict::of(204), Verdict::Delivered);
        for status in [400, 413, 422] {
            assert_eq!(Verdict::of(status), Verdict::Rejected);
        }
        for status in [301, 401, 403, 404, 408, 429, 500, 503] {
            assert_eq!(Verdict::of(status), Verdict::Retry, "{status}");
        }
    }

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::default();
        let bases: Vec<u64> = (0..9)
            .map(|_| backoff.next_base().as_millis() as u64)
            .collect();
        assert_eq!(
            bases,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        backoff.reset();
        assert_eq!(backoff.next_base(), Backoff::INITIAL);
        backoff.reset();
        let mut base = Backoff::default();
        for _ in 0..20 {
            let expected = base.next_base();
            let delay = backoff.next_delay();
            assert!(
                delay >= expected / 2 && delay <= expected,
                "{delay:?} for {expected:?}"
            );
        }
    }

    #[test]
    fn heads_say_how_long_the_body_is_and_whether_the_connection_stays() {
        let head = parse_head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert_eq!(
            (head.status, head.content_length, head.keep_alive),
            (200, Some(2), true)
        );
        let head = parse_head("HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!head.keep_alive);
        let head = parse_head("HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert!(!head.keep_alive);
        let head = parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(head.chunked);
        for bad in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }
}
