//! A real browser through the relay (issue #16): Debian's Chromium, headless in the lab's
//! client namespace, driven by chromedriver over WebDriver, opens tests/browser/relay.html,
//! whose two RTCPeerConnections (`iceTransportPolicy: "relay"`, the relay their only ICE
//! server) can reach each other only through two allocations on the relay. They exchange
//! data-channel messages both ways, and getStats() must show the selected pair's local
//! candidate as a `relay` candidate whose `relayProtocol` is the transport under test:
//! `turns:` over TLS, `turn:` over UDP and over TCP, all three on port 443 of one listener
//! that carries UDP, TCP and TLS (the first byte of a TCP stream tells TLS from TURN).
//! Over UDP both allocations' channel data meets in the XDP hairpin, so the kernel relays it.
//!
//! The WebDriver protocol (W3C) is spoken here directly, a few JSON requests over HTTP, so
//! that nothing but chromium and chromedriver is needed.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use tests::agent::Agent;
use tests::{AGENT_METRICS, Lab, Netns, RELAY_V4, Site, TURN_CONTROL_METRICS, wait_for};
use tests_harness::required_tool;
use tests_harness::tls::{self, CertFiles, Validity};

/// Data-channel messages sent each way.
const MESSAGES: u64 = 20;
/// The port of the relay's listener that takes UDP, TCP and TLS alike.
const PORT: u16 = 443;
/// Where chromedriver listens, inside the client namespace.
const CHROMEDRIVER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9515));
/// How long the page may take to connect and exchange the messages; it reports its own
/// failure (with what happened) after this, before WebDriver's script timeout.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);
/// The most a WebDriver request may take: starting the browser, or the page's run.
const REQUEST_DEADLINE: Duration = Duration::from_secs(40);

/// One way to reach the relay.
struct Transport {
    /// The ICE server's URL (RFC 7065), `{relay}` standing for the relay's address.
    url: &'static str,
    /// What getStats() must report as the local candidate's `relayProtocol`.
    relay_protocol: &'static str,
    /// Whether the channel data between the two allocations is relayed in the kernel.
    in_kernel: bool,
}

#[test]
fn chromium_relays_data_channels_over_turns_tls_on_port_443() {
    run(&Transport {
        url: "turns:{relay}:443?transport=tcp",
        relay_protocol: "tls",
        in_kernel: false,
    });
}

#[test]
fn chromium_relays_data_channels_over_turn_udp_on_port_443_in_the_kernel_hairpin() {
    run(&Transport {
        url: "turn:{relay}:443?transport=udp",
        relay_protocol: "udp",
        in_kernel: true,
    });
}

#[test]
fn chromium_relays_data_channels_over_turn_tcp_on_port_443() {
    run(&Transport {
        url: "turn:{relay}:443?transport=tcp",
        relay_protocol: "tcp",
        in_kernel: false,
    });
}

fn run(transport: &Transport) {
    let test = format!("browser ({})", transport.relay_protocol);
    if !tests::privileged() {
        return;
    }
    let (Some(chromium), Some(chromedriver), Some(_)) = (
        required_tool("chromium", &test),
        required_tool("chromedriver", &test),
        required_tool("certutil", &test),
    ) else {
        return;
    };
    let mut lab = Lab::new().unwrap();
    let (socket, certificate) = start_relay(&mut lab);
    let mut agent = Agent::connect(&socket).unwrap();

    let home = lab.dir().join("home");
    trust_ca(&home, &certificate.ca).unwrap();
    start_chromedriver(&mut lab, &chromedriver, &home);
    let _browser_processes = BrowserProcesses(&lab.client);

    let outcome = Browser::start(&lab.client, &chromium, &home).and_then(|mut browser| {
        let page = drive_page(&mut browser, transport, &mut agent);
        let console = browser.console_log();
        browser.quit();
        Ok((page?, console?))
    });
    let diagnostics = |lab: &Lab| {
        format!(
            "chromedriver's log, with chromium's stderr:\n{}\nturn-control's log:\n{}\nxdp-agent's log:\n{}",
            lab.log("chromedriver"),
            lab.log("turn-control"),
            lab.log("xdp-agent")
        )
    };
    let ((page, hairpin), console) =
        outcome.unwrap_or_else(|error| panic!("{test}: {error:#}\n{}", diagnostics(&lab)));
    let report = format!(
        "{test}: the page's events:\n{}\nthe browser's console:\n{console}\n{}",
        page.events,
        diagnostics(&lab)
    );
    let result = match page.outcome {
        Ok(result) => result,
        Err(error) => panic!("{test}: the page failed: {error}\n{report}"),
    };
    check_messages(&result).unwrap_or_else(|error| panic!("{test}: {error:#}\n{report}"));
    for side in ["offererPair", "answererPair"] {
        check_selected_pair(&result[side], transport.relay_protocol)
            .unwrap_or_else(|error| panic!("{test}: {side}: {error:#}\n{report}"));
    }
    let path = if transport.in_kernel {
        format!("{hairpin} packets in the kernel hairpin")
    } else {
        "relayed in user space".to_owned()
    };
    println!(
        "{test}: {MESSAGES} messages each way through {}, {path}",
        transport.url.replace("{relay}", &RELAY_V4.to_string()),
    );
    if transport.in_kernel {
        assert!(
            hairpin >= 2 * MESSAGES,
            "{test}: only {hairpin} packets crossed the kernel hairpin for {} messages\n{report}",
            2 * MESSAGES
        );
    }
    if transport.relay_protocol == "tls" {
        // One TLS connection per peer connection's TURN client, terminated by the relay.
        let metrics = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
        let handshakes = tests::sample_sum(&metrics, "turn_tls_handshakes_total");
        assert!(
            handshakes >= 2.0,
            "{test}: the relay counted {handshakes} TLS handshakes\n{report}"
        );
    }
}

/// Starts both daemons on the relay, turn-control listening on port 443 for UDP, TCP and
/// TLS (with a certificate for the relay's address signed by a fresh CA) beside the lab's
/// 3478; the agent's gRPC socket and the certificate.
fn start_relay(lab: &mut Lab) -> (PathBuf, CertFiles) {
    let certificate = tls::certificate(
        lab.dir(),
        "relay",
        &[&RELAY_V4.to_string(), "relay.lab.example"],
        Validity::days(30),
    )
    .unwrap();
    let listener = format!("{RELAY_V4}:{PORT}");
    // The two allocations are each other's peer: the relay's own address, which the
    // operator opens to both daemons (the hairpin).
    let relay_itself = format!("{RELAY_V4}/32");
    let socket = lab
        .start_xdp_agent(&[
            "--xdp-mode",
            "native",
            "--metrics",
            AGENT_METRICS,
            "--allow-peer",
            &relay_itself,
            "--listen",
            "0.0.0.0:3478",
            "--listen",
            "[::]:3478",
            "--listen",
            &listener,
        ])
        .unwrap();
    lab.start_turn_control(
        Some(&socket),
        &[
            "--listen",
            &listener,
            "--allow-peer",
            &relay_itself,
            "--tls-cert",
            certificate.cert.to_str().unwrap(),
            "--tls-key",
            certificate.key.to_str().unwrap(),
        ],
    )
    .unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    (socket, certificate)
}

/// Starts chromedriver in the client namespace with `home` as HOME.
fn start_chromedriver(lab: &mut Lab, chromedriver: &Path, home: &Path) {
    let mut command = lab.client.command(chromedriver);
    command
        .arg(format!("--port={}", CHROMEDRIVER.port()))
        // Its own log (each WebDriver command and response) and chromium's stderr (the
        // network service's and WebRTC's warnings and errors) in one, for failures.
        .args(["--enable-chrome-logs", "--log-level=INFO"])
        .env("HOME", home);
    lab.spawn("chromedriver", command).unwrap();
}

/// Runs the page: connects, waits for the kernel when the transport is relayed there, and
/// exchanges the messages. What the page reported, and the packets that crossed the kernel
/// hairpin during the exchange.
fn drive_page(
    browser: &mut Browser<'_>,
    transport: &Transport,
    agent: &mut Agent,
) -> anyhow::Result<(PageRun, u64)> {
    browser.open_page()?;
    let ice_server = json!({
        "urls": transport.url.replace("{relay}", &RELAY_V4.to_string()),
        "username": "test",
        "credential": "testpass",
    });
    let connected = browser.call("connect", json!({ "iceServer": ice_server }))?;
    if connected.outcome.is_err() {
        return Ok((connected, 0));
    }
    if transport.in_kernel {
        // libwebrtc (TurnEntry::Send) asks for a channel with its first payload datagram
        // (DTLS's first) and sends Send indications (RFC 8656 §11), which user space
        // serves, until the ChannelBind succeeds; turn-control answers it once the kernel
        // holds the channel (§12). Both allocations' channels must be there before the
        // messages are counted.
        wait_for(
            "both allocations' channel bindings in the kernel",
            PAGE_DEADLINE,
            || Ok((agent.list()?.len() >= 2).then_some(())),
        )?;
    }
    let before = agent.counter("relay_hairpin_v4_v4")?.0;
    let exchanged = browser.call("exchange", json!({ "messages": MESSAGES }))?;
    let hairpin = agent.counter("relay_hairpin_v4_v4")?.0 - before;
    Ok((exchanged, hairpin))
}

/// Makes Chromium trust the test's CA, made for this test alone, and nothing else
/// besides what it trusts anyway.
///
/// Chromium verifies a `turns:` server's certificate as it does an HTTPS server's: its
/// network service opens TURN's TCP and TLS connections (services/network/p2p) with the
/// browser's own resolver and certificate verifier. Untrusted, the handshake ends in an
/// alert (the relay counts `turn_tls_handshake_failures_total{reason="alert"}`), Chromium
/// logs `result=-202` (ERR_CERT_AUTHORITY_INVALID) and the page gets no relay candidate but
/// an icecandidateerror 701. `--ignore-certificate-errors-spki-list` with the leaf's key
/// hash gets through too, but waives every check of that leaf; a trust anchor keeps them
/// all (the chain, the validity, the IP address SAN against the URL's host). On Linux
/// Chromium takes locally added anchors from the NSS database in `$HOME/.pki/nssdb`: the
/// CA goes there, in a HOME of the lab's own.
fn trust_ca(home: &Path, ca: &Path) -> anyhow::Result<()> {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db)?;
    let db = format!("sql:{}", db.display());
    tests::run("certutil", ["-N", "-d", &db, "--empty-password"])?;
    let ca = ca.to_str().context("the CA's path is not UTF-8")?;
    // "C,,": a trusted CA for TLS servers, not for e-mail or code signing.
    tests::run(
        "certutil",
        [
            "-A",
            "-d",
            &db,
            "-n",
            "relay test CA",
            "-t",
            "C,,",
            "-i",
            ca,
        ],
    )?;
    Ok(())
}

/// What the page reported.
struct PageRun {
    /// Its result, or why it failed.
    outcome: Result<Value, String>,
    /// What happened, one event a line.
    events: String,
}

/// Both directions delivered every message, each once, in order.
fn check_messages(result: &Value) -> anyhow::Result<()> {
    for direction in ["offererToAnswerer", "answererToOfferer"] {
        let sent = &result["sent"][direction];
        let received = &result["received"][direction];
        let count = sent.as_array().map_or(0, Vec::len);
        ensure!(
            count as u64 == MESSAGES,
            "{direction}: the page sent {count} messages, not {MESSAGES}"
        );
        ensure!(
            received == sent,
            "{direction}: received {received} for sent {sent}"
        );
    }
    Ok(())
}

/// The selected pair joins two relayed candidates on the relay, the local one relayed over
/// `relay_protocol` (webrtc-stats' RTCIceCandidateStats.relayProtocol).
fn check_selected_pair(pair: &Value, relay_protocol: &str) -> anyhow::Result<()> {
    ensure!(pair.is_object(), "no selected candidate pair in getStats()");
    let relay = RELAY_V4.to_string();
    for end in ["local", "remote"] {
        let candidate = &pair[end];
        ensure!(
            candidate["candidateType"] == "relay" && candidate["address"] == relay.as_str(),
            "the {end} candidate is not relayed by {relay}: {candidate}"
        );
    }
    ensure!(
        pair["local"]["relayProtocol"] == relay_protocol,
        "the local candidate's relayProtocol is not {relay_protocol}: {}",
        pair["local"]
    );
    Ok(())
}

/// A WebDriver session of the chromedriver in `netns`, ended (and its browser closed) on
/// drop.
struct Browser<'a> {
    netns: &'a Netns,
    session: Option<String>,
}

impl<'a> Browser<'a> {
    /// Waits for chromedriver, then starts Chromium headless with its profile under `home`.
    fn start(netns: &'a Netns, chromium: &Path, home: &Path) -> anyhow::Result<Self> {
        let mut last = None;
        wait_for("chromedriver to be ready", REQUEST_DEADLINE, || {
            match webdriver(netns, "GET", "/status", None) {
                Ok(status) if status["ready"] == true => return Ok(Some(())),
                Ok(status) => last = Some(status.to_string()),
                Err(error) => last = Some(format!("{error:#}")),
            }
            Ok(None)
        })
        .with_context(|| format!("its last answer to GET /status: {last:?}"))?;
        let profile = home.join("profile");
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Chromium will not run as root with its sandbox; the page is the
                    // test's own.
                    "--no-sandbox",
                    format!("--user-data-dir={}", profile.display()),
                    // No name resolves: the namespace has a default route but no way
                    // out, and Chromium's own fetches at start-up (the new tab page's)
                    // would stall on DNS for seconds. The rules apply to IP literals
                    // too, since TURN over TCP and TLS goes through Chromium's network
                    // stack: the relay's address is left alone.
                    format!("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {RELAY_V4}"),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
            "timeouts": { "script": REQUEST_DEADLINE.as_millis() as u64 },
        });
        let session = webdriver(
            netns,
            "POST",
            "/session",
            Some(&json!({ "capabilities": { "alwaysMatch": capabilities } })),
        )
        .context("starting Chromium")?;
        let id = session["sessionId"]
            .as_str()
            .with_context(|| format!("no sessionId in {session}"))?;
        Ok(Self {
            netns,
            session: Some(id.to_owned()),
        })
    }

    /// Opens tests/browser/relay.html.
    fn open_page(&mut self) -> anyhow::Result<()> {
        let page = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser/relay.html");
        self.command(
            "url",
            json!({ "url": format!("file://{}", page.display()) }),
        )?;
        Ok(())
    }

    /// Runs the page's `relayTest[step](options)`, with the page's deadline added.
    fn call(&mut self, step: &str, mut options: Value) -> anyhow::Result<PageRun> {
        options["deadlineMs"] = json!(PAGE_DEADLINE.as_millis() as u64);
        let run = self.command(
            "execute/async",
            json!({
                "script": format!("relayTest.{step}(arguments[0]).then(arguments[1]);"),
                "args": [options],
            }),
        )?;
        let events = run["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .map(|event| event.as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        let outcome = match &run["error"] {
            Value::Null => Ok(run["result"].clone()),
            error => Err(error.to_string()),
        };
        Ok(PageRun { outcome, events })
    }

    /// The browser's console messages so far (chromedriver's `browser` log).
    fn console_log(&mut self) -> anyhow::Result<String> {
        let entries = self.command("se/log", json!({ "type": "browser" }))?;
        Ok(entries
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|entry| format!("{} {}", entry["level"], entry["message"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default())
    }

    /// Ends the session: chromedriver closes the browser.
    fn quit(&mut self) {
        if let Some(session) = self.session.take()
            && let Err(error) =
                webdriver(self.netns, "DELETE", &format!("/session/{session}"), None)
        {
            eprintln!("browser: cannot end the WebDriver session: {error:#}");
        }
    }

    fn command(&self, command: &str, body: Value) -> anyhow::Result<Value> {
        let session = self.session.as_deref().context("the session has ended")?;
        webdriver(
            self.netns,
            "POST",
            &format!("/session/{session}/{command}"),
            Some(&body),
        )
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        self.quit();
    }
}

/// Kills, on drop, every process left in the namespace but chromedriver (which the lab
/// stops itself): the browser's, whether or not a session ended it.
struct BrowserProcesses<'a>(&'a Netns);

impl Drop for BrowserProcesses<'_> {
    fn drop(&mut self) {
        let Ok(pids) = tests::run("ip", ["netns", "pids", self.0.name()]) else {
            return;
        };
        for pid in pids
            .lines()
            .filter_map(|pid| pid.trim().parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "chromedriver" {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// One WebDriver request to the chromedriver in `netns`: the response's `value`, or the
/// WebDriver error it carries.
fn webdriver(
    netns: &Netns,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut stream = netns.enter(|| Ok(TcpStream::connect(CHROMEDRIVER)?))?;
    stream.set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(5)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {CHROMEDRIVER}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open whatever the request asks: read the head,
    // then as many bytes as it announces.
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .with_context(|| format!("{method} {path}: no response"))?;
    let status = status_line.split(' ').nth(1).unwrap_or_default().to_owned();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .with_context(|| format!("{method} {path}: a short response"))?;
    let mut response: Value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{method} {path}: {status}, not JSON: {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    let value = response["value"].take();
    if status != "200" {
        bail!(
            "{method} {path}: {status} {}: {}",
            value["error"],
            value["message"]
        );
    }
    Ok(value)
}
