//! A blocking UDP STUN/TURN client with long-term credentials that follows 401/438 for the
//! nonce, over the codec of [`tests_stun`] (re-exported here).

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
pub use tests_stun::*;

/// Long-term credentials (RFC 8489 §9.2) as a client holds them: the user and password, the
/// realm and nonce the server gave (learnt from its 401 and 438), and the key that follows
/// the realm.
#[derive(Debug, Clone)]
pub struct LongTerm {
    user: String,
    password: String,
    realm: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    /// The current nonce (none before the first 401).
    pub nonce: Option<Vec<u8>>,
}

impl LongTerm {
    /// `user:password`, with no realm or nonce yet.
    pub fn new(user: &str, password: &str) -> Self {
        Self {
            user: user.to_owned(),
            password: password.to_owned(),
            realm: None,
            key: None,
            nonce: None,
        }
    }

    /// Takes `realm`, and the key it gives.
    pub fn set_realm(&mut self, realm: &[u8]) {
        self.key = Some(long_term_key(
            &self.user,
            &String::from_utf8_lossy(realm),
            &self.password,
        ));
        self.realm = Some(realm.to_vec());
    }

    /// The realm (once known).
    pub fn realm(&self) -> Option<&[u8]> {
        self.realm.as_deref()
    }

    /// The long-term key (once the realm is known).
    pub fn key(&self) -> Option<[u8; 16]> {
        self.key
    }

    /// `msg` finished (with FINGERPRINT if `fingerprint`): signed once a nonce is known.
    pub fn finish(&self, msg: &mut Msg, fingerprint: bool) -> Vec<u8> {
        match (&self.nonce, &self.realm, self.key) {
            (Some(nonce), Some(realm), Some(key)) => msg
                .credentials(&self.user, realm, nonce)
                .finish(Some(&key), fingerprint),
            _ => msg.finish(None, fingerprint),
        }
    }

    /// Learns the realm and nonce of a 401 or 438 that carries a nonce; whether `answer` was
    /// one (then the request is to be sent again).
    pub fn learn(&mut self, answer: &Answer) -> bool {
        let (Some(401 | 438), Some(nonce)) = (answer.error_code(), answer.attr(attr::NONCE)) else {
            return false;
        };
        if let Some(realm) = answer.attr(attr::REALM)
            && self.realm.as_deref() != Some(realm)
        {
            self.set_realm(realm);
        }
        self.nonce = Some(nonce.to_vec());
        true
    }
}

/// A blocking UDP client with long-term credentials. The realm is learnt from the first
/// 401 unless given; the key follows it.
#[derive(Debug)]
pub struct Client {
    /// The client's socket.
    pub socket: UdpSocket,
    /// The server.
    pub server: SocketAddr,
    /// The credentials, realm and nonce.
    pub credentials: LongTerm,
    txid: u64,
    /// The first byte of every transaction id (tells clients apart in captures).
    pub txid_tag: u8,
    /// Transmissions of one request before giving up.
    pub tries: u32,
    /// How long each transmission waits for its answer.
    pub wait: Duration,
    /// Datagrams sent.
    pub sent: u64,
}

impl Client {
    /// A client of `server` over `socket` (its read timeout is set to 200 ms) as
    /// `user:password`; `realm`: `None` to take the server's from its 401.
    pub fn new(
        socket: UdpSocket,
        server: SocketAddr,
        user: &str,
        password: &str,
        realm: Option<&str>,
    ) -> anyhow::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut client = Self {
            socket,
            server,
            credentials: LongTerm::new(user, password),
            txid: 0,
            txid_tag: 0x5A,
            tries: 5,
            wait: Duration::from_millis(500),
            sent: 0,
        };
        if let Some(realm) = realm {
            client.credentials.set_realm(realm.as_bytes());
        }
        Ok(client)
    }

    /// The realm (once known).
    pub fn realm(&self) -> Option<&[u8]> {
        self.credentials.realm()
    }

    /// The long-term key (once the realm is known).
    pub fn key(&self) -> Option<[u8; 16]> {
        self.credentials.key()
    }

    /// A fresh transaction id.
    pub fn next_txid(&mut self) -> [u8; 12] {
        self.txid += 1;
        let mut t = [self.txid_tag; 12];
        t[4..].copy_from_slice(&self.txid.to_be_bytes());
        t
    }

    /// A request of `method` with what `build` adds, signed when a nonce is known.
    pub fn build(&mut self, method: u16, build: impl Fn(&mut Msg) -> &mut Msg) -> Vec<u8> {
        let mut msg = Msg::new(method, class::REQUEST, self.next_txid());
        build(&mut msg);
        self.credentials.finish(&mut msg, false)
    }

    /// Sends `request` (the same bytes each time, up to `tries` times) until an answer
    /// with its transaction id arrives; `None` if none does.
    pub fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Option<Answer>> {
        let txid = request.get(8..20).context("short request")?;
        let mut buf = [0u8; 2048];
        for _ in 0..self.tries {
            self.socket.send_to(request, self.server)?;
            self.sent += 1;
            let start = Instant::now();
            while start.elapsed() < self.wait {
                match self.socket.recv(&mut buf) {
                    Ok(n) => {
                        if let Some(a) = Answer::parse(&buf[..n])
                            && a.txid == txid
                        {
                            return Ok(Some(a));
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("recv"),
                }
            }
        }
        Ok(None)
    }

    /// An authenticated request; follows 401 and 438 for the realm and nonce (three times
    /// at most). Fails when it goes unanswered.
    pub fn request(
        &mut self,
        method: u16,
        build: impl Fn(&mut Msg) -> &mut Msg,
    ) -> anyhow::Result<Answer> {
        for _ in 0..3 {
            let request = self.build(method, &build);
            let answer = self
                .exchange(&request)?
                .with_context(|| format!("method {method:#x} unanswered"))?;
            if answer.method != method {
                bail!("answer of method {:#x} to {method:#x}", answer.method);
            }
            if !self.credentials.learn(&answer) {
                return Ok(answer);
            }
        }
        bail!("authentication did not converge")
    }

    /// A UDP allocation.
    pub fn allocate(&mut self) -> anyhow::Result<Answer> {
        self.request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        })
    }

    /// A UDP allocation that must succeed: its relayed address.
    pub fn allocate_relayed(&mut self) -> anyhow::Result<SocketAddr> {
        let answer = self.allocate()?;
        anyhow::ensure!(
            answer.class == class::SUCCESS,
            "Allocate answered {:?}",
            answer.error_code()
        );
        answer
            .xor_addr(attr::XOR_RELAYED_ADDRESS)
            .context("no XOR-RELAYED-ADDRESS")
    }
}
