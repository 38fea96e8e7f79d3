//! A blocking UDP STUN/TURN client with long-term credentials that follows 401/438 for the
//! nonce, over the codec of [`tests_stun`] (re-exported here).

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
pub use tests_stun::*;

/// A blocking UDP client with long-term credentials. The realm is learnt from the first
/// 401 unless given; the key follows it.
#[derive(Debug)]
pub struct Client {
    /// The client's socket.
    pub socket: UdpSocket,
    /// The server.
    pub server: SocketAddr,
    user: String,
    password: String,
    realm: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    /// The current nonce (none before the first 401).
    pub nonce: Option<Vec<u8>>,
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
            user: user.to_owned(),
            password: password.to_owned(),
            realm: None,
            key: None,
            nonce: None,
            txid: 0,
            txid_tag: 0x5A,
            tries: 5,
            wait: Duration::from_millis(500),
            sent: 0,
        };
        if let Some(realm) = realm {
            client.set_realm(realm.as_bytes());
        }
        Ok(client)
    }

    fn set_realm(&mut self, realm: &[u8]) {
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
        match (&self.nonce, &self.realm, self.key) {
            (Some(nonce), Some(realm), Some(key)) => msg
                .credentials(&self.user, realm, nonce)
                .finish(Some(&key), false),
            _ => msg.finish(None, false),
        }
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
            match answer.error_code() {
                Some(401 | 438) if let Some(nonce) = answer.attr(attr::NONCE) => {
                    if let Some(realm) = answer.attr(attr::REALM)
                        && self.realm.as_deref() != Some(realm)
                    {
                        let realm = realm.to_vec();
                        self.set_realm(&realm);
                    }
                    self.nonce = Some(nonce.to_vec());
                }
                _ => return Ok(answer),
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
}
