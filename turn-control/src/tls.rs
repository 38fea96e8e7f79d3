//! TURN over TLS (RFC 8656 §3.1 and §3.2; port 5349 by RFC 7350 §3, or 443): the server's
//! certificate, its reloads, and the handshake of a connection whose first byte said TLS.
//! After the handshake the stream is framed exactly as TURN over TCP, by the same code.
//!
//! - rustls with the `aws-lc-rs` provider: TLS 1.3 and 1.2 with AEAD suites only. aws-lc-rs is
//!   rustls's default and best-maintained provider (AWS's fork of BoringSSL, FIPS-validated
//!   upstream), the fastest of them at what a TURN handshake and its small records spend time
//!   in (ECDSA P-256, X25519, AES-GCM), and the one with the post-quantum hybrid key exchange
//!   X25519MLKEM768 that current browsers offer first (ring has none, and rustls deprecates its
//!   provider for that). BENCHMARKS.md measures the result beside coturn's OpenSSL.
//! - ALPN: `stun.turn` (RFC 7443 §3) is selected for a client that offers it. A client that
//!   offers none, or only other protocols (a browser may send what its HTTP stack sends), is
//!   served without ALPN rather than refused: RFC 7443 lets the server choose, and refusing
//!   would only break clients that predate the token.
//! - Session resumption: TLS 1.3 tickets and TLS 1.2 tickets from a rotating ticket key, and
//!   a cache of TLS 1.2 session IDs. Both survive certificate reloads (the configuration
//!   stays; only the certificate it resolves to changes).
//! - The certificate ([`ServedCertificate`]) is read from PEM files at start, where any fault
//!   stops the daemon with one line, and again on SIGHUP or when a file changes on disk
//!   ([`watch`]); a reload that fails keeps the served certificate and says why. Connections
//!   never notice a reload: a handshake takes whatever certificate is current when it runs.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    Acceptor, ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, ProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics::name;

/// The ALPN token of TURN (RFC 7443 §3).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";
/// TLS 1.2 sessions remembered for resumption by session ID (a few hundred bytes each).
const SESSION_CACHE: usize = 16 * 1024;
/// How often the certificate files are looked at for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// A certificate and key as PEM files: the chain (leaf first) and the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain, leaf first (certbot's `fullchain.pem`, cert-manager's `tls.crt`).
    pub cert: PathBuf,
    /// The leaf's private key: PKCS#8, SEC1 (EC) or PKCS#1 (RSA).
    pub key: PathBuf,
}

/// Why a certificate cannot be served: one line naming the file and the fault.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A file cannot be read.
    #[error("cannot read {path}: {error}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The chain file holds no PEM certificate.
    #[error("{path}: no certificate (a PEM \"BEGIN CERTIFICATE\" block) in the file")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no usable private key.
    #[error("{path}: no usable private key (PEM PKCS#8, EC or RSA): {detail}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the parser or the provider said.
        detail: String,
    },
    /// The key is not the leaf's.
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The chain file.
        cert: PathBuf,
    },
    /// The leaf cannot be parsed.
    #[error("{path}: the first certificate cannot be parsed: {detail}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: &'static str,
    },
    /// The leaf's notAfter has passed.
    #[error("{path}: the certificate expired at {not_after}")]
    Expired {
        /// The chain file.
        path: PathBuf,
        /// When.
        not_after: UnixTime,
    },
}

/// A certificate ready to serve, and when it stops being valid.
#[derive(Debug)]
pub struct Loaded {
    key: Arc<CertifiedKey>,
    /// The leaf's notBefore.
    pub not_before: UnixTime,
    /// The leaf's notAfter.
    pub not_after: UnixTime,
}

impl CertificateFiles {
    /// Reads and checks the files: a chain, a key that matches its leaf, a leaf that has not
    /// expired. A leaf not valid yet is served (with a warning by the caller): clocks differ.
    pub fn load(
        &self,
        provider: &CryptoProvider,
        now: UnixTime,
    ) -> Result<Loaded, CertificateError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| CertificateError::Unreadable {
                path: path.to_owned(),
                error,
            })
        };
        let chain_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .filter_map(Result::ok)
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| CertificateError::NoCertificate {
                path: self.cert.clone(),
            })?;
        let validity = Validity::of(leaf).map_err(|detail| CertificateError::Malformed {
            path: self.cert.clone(),
            detail,
        })?;
        if validity.not_after < now {
            return Err(CertificateError::Expired {
                path: self.cert.clone(),
                not_after: validity.not_after,
            });
        }
        let no_key = |detail: String| CertificateError::NoKey {
            path: self.key.clone(),
            detail,
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| no_key(e.to_string()))?;
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| no_key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CertificateError::KeyMismatch {
                    key: self.key.clone(),
                    cert: self.cert.clone(),
                });
            }
            // The provider cannot tell (it does not derive the public key): the first
            // handshake will.
            Err(_) => {}
        }
        Ok(Loaded {
            key: Arc::new(certified),
            not_before: validity.not_before,
            not_after: validity.not_after,
        })
    }

    /// What identifies the files' current contents without reading them: a renewal replaces
    /// them (a rename, a symlink swap, or a rewrite in place), and each of those changes the
    /// inode, the modification time or the size of the path as followed.
    fn fingerprint(&self) -> Option<[FileFingerprint; 2]> {
        use std::os::unix::fs::MetadataExt as _;
        let of = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        };
        Some([of(&self.cert)?, of(&self.key)?])
    }
}

/// A file's device, inode, modification time (seconds, nanoseconds) and size.
type FileFingerprint = (u64, u64, i64, i64, u64);

/// The certificate handshakes are served, swapped by reloads.
#[derive(Debug)]
pub struct ServedCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&daemon::read(&self.current)))
    }
}

/// The TLS side of the TCP listeners: the server configurations (with and without ALPN,
/// sharing the certificate, session cache and ticket key), the files to reload from and the
/// handshake deadline.
#[derive(Debug)]
pub struct Tls {
    files: CertificateFiles,
    provider: Arc<CryptoProvider>,
    served: Arc<ServedCertificate>,
    with_alpn: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
    handshake_timeout: Duration,
    /// The files' fingerprint when they were last read, loaded or not: a change is what
    /// [`watch`] looks for.
    last_read: std::sync::Mutex<Option<[FileFingerprint; 2]>>,
    /// The served leaf's notAfter (Unix time), for [`Tls::publish`].
    not_after: AtomicI64,
}

impl Tls {
    /// Loads the certificate from `files` (any fault is the caller's error, one line) and
    /// makes the server configurations.
    pub fn new(files: CertificateFiles, handshake_timeout: Duration) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let fingerprint = files.fingerprint();
        let loaded = files.load(&provider, UnixTime::now())?;
        if loaded.not_before > UnixTime::now() {
            tracing::warn!(cert = %files.cert.display(), not_before = %loaded.not_before, "the TLS certificate is not valid yet");
        }
        let served = Arc::new(ServedCertificate {
            current: RwLock::new(Arc::clone(&loaded.key)),
        });
        let sessions = ServerSessionMemoryCache::new(SESSION_CACHE);
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        let config = |alpn: Vec<Vec<u8>>| -> anyhow::Result<Arc<ServerConfig>> {
            let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(Arc::clone(&served) as Arc<dyn ResolvesServerCert>);
            config.alpn_protocols = alpn;
            config.session_storage = Arc::clone(&sessions) as _;
            config.ticketer = Arc::clone(&ticketer);
            Ok(Arc::new(config))
        };
        let this = Arc::new(Self {
            with_alpn: config(vec![ALPN_STUN_TURN.to_vec()])?,
            without_alpn: config(Vec::new())?,
            files,
            provider,
            served,
            handshake_timeout,
            last_read: std::sync::Mutex::new(fingerprint),
            not_after: AtomicI64::new(loaded.not_after.0),
        });
        this.loaded(&loaded);
        Ok(this)
    }

    /// Reads the files again and serves what they hold from the next handshake on; on a
    /// fault keeps the served certificate and says why. `why` is what asked (for the log).
    pub fn reload(&self, why: &str) {
        *daemon::lock(&self.last_read) = self.files.fingerprint();
        match self.files.load(&self.provider, UnixTime::now()) {
            Ok(loaded) => {
                *daemon::write(&self.served.current) = Arc::clone(&loaded.key);
                self.loaded(&loaded);
                metrics::counter!(name::TLS_RELOADS, "result" => "ok").increment(1);
            }
            Err(error) => {
                metrics::counter!(name::TLS_RELOADS, "result" => "error").increment(1);
                tracing::error!(%error, why, "TLS certificate reload failed; serving the previous certificate");
            }
        }
    }

    /// Whether the files changed since they were last read.
    fn files_changed(&self) -> bool {
        let now = self.files.fingerprint();
        // A file missing for a moment (a rename in two steps) is no change yet.
        now.is_some() && now != *daemon::lock(&self.last_read)
    }

    /// Sets the expiry gauge (the recorder may not have existed when the certificate loaded).
    pub fn publish(&self) {
        let not_after = self.not_after.load(Ordering::Relaxed);
        metrics::gauge!(name::TLS_CERTIFICATE_EXPIRY).set(not_after as f64);
    }

    fn loaded(&self, loaded: &Loaded) {
        self.not_after.store(loaded.not_after.0, Ordering::Relaxed);
        self.publish();
        tracing::info!(
            cert = %self.files.cert.display(),
            key = %self.files.key.display(),
            not_after = %loaded.not_after,
            "TLS certificate loaded"
        );
    }

    /// The handshake of a connection whose first byte was a TLS handshake record, within
    /// the handshake deadline; counted either way.
    pub async fn handshake(
        &self,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, HandshakeFailure> {
        let handshake = async {
            let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
                .await
                .map_err(|e| HandshakeFailure::of(&e))?;
            let offers_turn = start
                .client_hello()
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == ALPN_STUN_TURN));
            let config = if offers_turn {
                &self.with_alpn
            } else {
                &self.without_alpn
            };
            start
                .into_stream(Arc::clone(config))
                .await
                .map_err(|e| HandshakeFailure::of(&e))
        };
        let result = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(HandshakeFailure::Timeout),
        };
        match &result {
            Ok(stream) => {
                let (_, connection) = stream.get_ref();
                let version = match connection.protocol_version() {
                    Some(ProtocolVersion::TLSv1_3) => "1.3",
                    Some(ProtocolVersion::TLSv1_2) => "1.2",
                    _ => "other",
                };
                let resumed = connection.handshake_kind() == Some(HandshakeKind::Resumed);
                metrics::counter!(name::TLS_HANDSHAKES, "version" => version, "resumed" => if resumed { "true" } else { "false" })
                    .increment(1);
            }
            Err(failure) => {
                metrics::counter!(name::TLS_HANDSHAKE_FAILURES, "reason" => failure.label())
                    .increment(1);
            }
        }
        result
    }
}

/// Why a handshake failed: the `reason` label of [`name::TLS_HANDSHAKE_FAILURES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not complete within the handshake deadline.
    Timeout,
    /// No protocol version, cipher suite, group or signature scheme in common.
    NoCommonCipher,
    /// The client aborted with an alert (e.g. it rejected the certificate).
    Alert,
    /// The client closed or reset the connection mid-handshake.
    Closed,
    /// A malformed or misbehaving peer: not TLS after all, bad messages.
    Protocol,
}

impl HandshakeFailure {
    fn of(error: &io::Error) -> Self {
        use rustls::Error as E;
        match error.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
            Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => Self::NoCommonCipher,
            Some(E::AlertReceived(_)) => Self::Alert,
            Some(_) => Self::Protocol,
            None => match error.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => Self::Closed,
                _ => Self::Protocol,
            },
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoCommonCipher => "no_common_cipher",
            Self::Alert => "alert",
            Self::Closed => "closed",
            Self::Protocol => "protocol",
        }
    }
}

/// Reloads the certificate whenever its files change on disk (looked at every
/// [`WATCH_INTERVAL`]); runs until the task is dropped.
pub async fn watch(tls: Arc<Tls>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tls.files_changed() {
            tls.reload("the certificate files changed");
        }
    }
}

/// Seconds since the Unix epoch (UTC), as certificates' validity is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(pub i64);

impl UnixTime {
    /// Now, by the system clock.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        UnixTime(i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for UnixTime {
    /// RFC 3339 in UTC, e.g. `2026-12-05T16:45:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (days, secs) = (self.0.div_euclid(86_400), self.0.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// A certificate's validity period (RFC 5280 §4.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Validity {
    not_before: UnixTime,
    not_after: UnixTime,
}

impl Validity {
    /// Reads the validity of a DER certificate: Certificate ::= SEQUENCE { tbsCertificate
    /// SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity, ... } ...}
    /// (RFC 5280 §4.1). Only the path to the validity is walked; rustls and the clients
    /// check the rest.
    fn of(der: &[u8]) -> Result<Self, &'static str> {
        const SEQUENCE: u8 = 0x30;
        let (certificate, _) = der_element(der, SEQUENCE)?;
        let (tbs, _) = der_element(certificate, SEQUENCE)?;
        let mut rest = tbs;
        if rest.first() == Some(&0xa0) {
            rest = der_element(rest, 0xa0)?.1;
        }
        rest = der_element(rest, 0x02)?.1; // serialNumber INTEGER
        rest = der_element(rest, SEQUENCE)?.1; // signature AlgorithmIdentifier
        rest = der_element(rest, SEQUENCE)?.1; // issuer Name
        let (validity, _) = der_element(rest, SEQUENCE)?;
        let (not_before, rest) = der_time(validity)?;
        let (not_after, _) = der_time(rest)?;
        Ok(Validity {
            not_before,
            not_after,
        })
    }
}

/// The contents of the DER element at the start of `input`, which must have tag `tag`, and
/// what follows it.
fn der_element(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), &'static str> {
    const TRUNCATED: &str = "truncated DER";
    let (&found, rest) = input.split_first().ok_or(TRUNCATED)?;
    if found != tag {
        return Err("unexpected DER element");
    }
    let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return Err("bad DER length");
        }
        let len = rest[..octets]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        rest = &rest[octets..];
        len
    };
    if rest.len() < len {
        return Err(TRUNCATED);
    }
    Ok(rest.split_at(len))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the
/// forms RFC 5280 §4.1.2.5 allows, and what follows it.
fn der_time(input: &[u8]) -> Result<(UnixTime, &[u8]), &'static str> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let (text, rest, year_digits) = match input.first() {
        Some(&UTC_TIME) => {
            let (text, rest) = der_element(input, UTC_TIME)?;
            (text, rest, 2)
        }
        Some(&GENERALIZED_TIME) => {
            let (text, rest) = der_element(input, GENERALIZED_TIME)?;
            (text, rest, 4)
        }
        _ => return Err("the validity is not a UTCTime or GeneralizedTime"),
    };
    const BAD: &str = "malformed validity time";
    if text.len() != year_digits + 11 || text.last() != Some(&b'Z') {
        return Err(BAD);
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, &'static str> {
        text[range].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit()
                .then(|| n * 10 + i64::from(c - b'0'))
                .ok_or(BAD)
        })
    };
    let mut year = number(0..year_digits)?;
    if year_digits == 2 {
        year += if year >= 50 { 1900 } else { 2000 };
    }
    let at = year_digits;
    let (month, day) = (number(at..at + 2)?, number(at + 2..at + 4)?);
    let (hour, minute, second) = (
        number(at + 4..at + 6)?,
        number(at + 6..at + 8)?,
        number(at + 8..at + 10)?,
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(BAD);
    }
    let days = days_from_civil(year, month, day);
    Ok((
        UnixTime(days * 86_400 + hour * 3600 + minute * 60 + second),
        rest,
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use tests_harness::scratch::TempDir;
    use tests_harness::tls::{Validity as Days, certificate};

    use super::*;

    fn files(cert: &Path, key: &Path) -> CertificateFiles {
        CertificateFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::aws_lc_rs::default_provider()
    }

    #[test]
    fn a_chain_and_its_key_load_with_the_leafs_validity() {
        let dir = TempDir::new("load");
        let good = certificate(&dir.0, "good", &["192.0.2.1"], Days::days(30)).unwrap();
        let loaded = files(&good.cert, &good.key)
            .load(&provider(), UnixTime::now())
            .unwrap();
        assert_eq!(loaded.key.cert.len(), 2, "the leaf and the CA");
        assert_eq!(loaded.key.cert[0].as_ref(), good.leaf_der.as_slice());
        let days = (loaded.not_after.0 - UnixTime::now().0) as f64 / 86_400.0;
        assert!((29.9..=30.1).contains(&days), "{days} days");
        assert!(loaded.not_before < UnixTime::now());
    }

    #[test]
    fn every_fault_is_one_line_naming_the_file() {
        let dir = TempDir::new("faults");
        let good = certificate(&dir.0, "good", &["relay.example"], Days::days(30)).unwrap();
        let other = certificate(&dir.0, "other", &["relay.example"], Days::days(30)).unwrap();
        let expired = certificate(&dir.0, "expired", &["relay.example"], Days::expired()).unwrap();
        let garbage = dir.0.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let missing = dir.0.join("missing.pem");
        let error = |cert: &Path, key: &Path| {
            let message = files(cert, key)
                .load(&provider(), UnixTime::now())
                .unwrap_err()
                .to_string();
            assert!(!message.contains('\n'), "{message}");
            message
        };
        let message = error(&missing, &good.key);
        assert!(
            message.starts_with(&format!("cannot read {}: ", missing.display())),
            "{message}"
        );
        assert!(message.contains("No such file"), "{message}");
        let message = error(&dir.0, &good.key);
        assert!(
            message.starts_with(&format!("cannot read {}", dir.0.display())),
            "{message}"
        );
        let message = error(&garbage, &good.key);
        assert!(message.contains("no certificate"), "{message}");
        let message = error(&good.cert, &garbage);
        assert!(message.contains("no usable private key"), "{message}");
        let message = error(&good.cert, &other.key);
        assert_eq!(
            message,
            format!(
                "{}: the private key does not match the certificate in {}",
                other.key.display(),
                good.cert.display()
            )
        );
        let message = error(&expired.cert, &expired.key);
        assert!(
            message.contains("the certificate expired at 20"),
            "{message}"
        );
    }

    #[test]
    fn a_reload_swaps_the_certificate_and_a_failed_one_keeps_it() {
        let dir = TempDir::new("reload");
        let first = certificate(&dir.0, "first", &["relay.example"], Days::days(30)).unwrap();
        let second = certificate(&dir.0, "second", &["relay.example"], Days::days(60)).unwrap();
        let (cert, key) = (dir.0.join("served.crt"), dir.0.join("served.key"));
        let install = |from: &tests_harness::tls::CertFiles| {
            std::fs::copy(&from.cert, &cert).unwrap();
            std::fs::copy(&from.key, &key).unwrap();
        };
        install(&first);
        let tls = Tls::new(files(&cert, &key), Duration::from_secs(10)).unwrap();
        let served = || daemon::read(&tls.served.current).cert[0].as_ref().to_vec();
        assert_eq!(served(), first.leaf_der);
        assert!(!tls.files_changed());

        // A renewal by rename: seen as a change, loaded.
        let renewed = dir.0.join("renewed.crt");
        std::fs::copy(&second.cert, &renewed).unwrap();
        std::fs::copy(&second.key, &key).unwrap();
        std::fs::rename(&renewed, &cert).unwrap();
        assert!(tls.files_changed());
        tls.reload("test");
        assert_eq!(served(), second.leaf_der);
        assert!(!tls.files_changed());
        let days = (tls.not_after.load(Ordering::Relaxed) - UnixTime::now().0) / 86_400;
        assert!((59..=60).contains(&days), "{days}");

        // A key that does not match: the served certificate stays.
        std::fs::copy(&first.key, &key).unwrap();
        tls.reload("test");
        assert_eq!(served(), second.leaf_der);
    }

    #[test]
    fn dates_convert_both_ways() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(UnixTime(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(UnixTime(4_102_444_800).to_string(), "2100-01-01T00:00:00Z");
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn both_time_forms_are_read() {
        // UTCTime 491231235959Z is 2049; 500101000000Z is 1950 (RFC 5280 §4.1.2.5.1).
        let utc = |s: &str| [&[0x17, s.len() as u8][..], s.as_bytes()].concat();
        let generalized = |s: &str| [&[0x18, s.len() as u8][..], s.as_bytes()].concat();
        let at = |der: Vec<u8>| der_time(&der).map(|(t, _)| t.to_string());
        assert_eq!(at(utc("491231235959Z")), Ok("2049-12-31T23:59:59Z".into()));
        assert_eq!(at(utc("500101000000Z")), Ok("1950-01-01T00:00:00Z".into()));
        assert_eq!(
            at(generalized("20991231120000Z")),
            Ok("2099-12-31T12:00:00Z".into())
        );
        assert!(at(utc("4912312359Z")).is_err());
        assert!(at(utc("491331235959Z")).is_err());
        assert!(at(generalized("2099123112000+0100")).is_err());
        assert!(der_time(&[0x02, 1, 0]).is_err());
    }

    #[test]
    fn truncated_der_is_refused() {
        assert!(der_element(&[], 0x30).is_err());
        assert!(der_element(&[0x30, 5, 1, 2], 0x30).is_err());
        assert!(der_element(&[0x30, 0x85, 0, 0, 0, 0, 1], 0x30).is_err());
        assert_eq!(
            der_element(&[0x30, 0x81, 1, 7, 9], 0x30),
            Ok((&[7u8][..], &[9u8][..]))
        );
    }
}
