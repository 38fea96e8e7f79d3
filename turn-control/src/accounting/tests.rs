//! The sink against a real file and a real HTTP server: Python's `http.server`, driven by
//! `tests/webhook_server.py`, whose behaviour the tests switch while records flow. For
//! `https://` the server is wrapped in Python's `ssl`, with certificates the `openssl`
//! command makes for each test.

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::*;
use crate::webhook::Endpoint;

/// A directory of its own under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "turn-control-accounting-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize)]
struct Record {
    n: u64,
    note: String,
}

fn record(n: u64) -> Record {
    Record {
        n,
        note: format!("record {n}\nwith a newline and a \u{2028}"),
    }
}

/// Polls `condition` until it holds; fails the test naming `what` after `within`.
fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `n` of each JSON line of `path` (none if it does not exist).
fn numbers_in(path: &Path) -> Vec<u64> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["n"].as_u64().unwrap()
        })
        .collect()
}

/// Fast retries so that the scenarios take seconds, with the production doubling.
fn quick_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(400))
}

/// A certificate and its key, PEM files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

/// Test certificates made by the `openssl` command in a directory of their own: CAs, and
/// server certificates they sign.
struct Pki {
    dir: TempDir,
    openssl: PathBuf,
}

impl Pki {
    /// None (the test skips) when `openssl` is not installed, unless CI requires it.
    fn new(test: &str) -> Option<Pki> {
        let openssl = tests_harness::required_tool("openssl", test)?;
        Some(Pki {
            dir: TempDir::new("pki"),
            openssl,
        })
    }

    /// Runs `openssl` with the words of `command` in the directory (no word has a space).
    fn run(&self, command: &str) {
        let output = Command::new(&self.openssl)
            .args(command.split_whitespace())
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A self-signed CA named `name` (P-256, valid for two days).
    fn ca(&self, name: &str) -> Issued {
        self.run(&format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN={name}-test-CA -keyout {name}.key -out {name}.pem \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        self.issued(name)
    }

    /// A server certificate that the CA `ca` signed, for `names` (subjectAltName syntax:
    /// `IP:...,DNS:...`).
    fn server(&self, ca: &str, name: &str, names: &str) -> Issued {
        fs::write(
            self.dir.0.join(format!("{name}.ext")),
            format!(
                "subjectAltName={names}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        self.run(&format!(
            "req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -subj /CN=collector -keyout {name}.key -out {name}.csr"
        ));
        let serial = rand::random::<u64>();
        self.run(&format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -set_serial 0x{serial:x} \
             -days 2 -extfile {name}.ext -out {name}.pem"
        ));
        self.issued(name)
    }

    /// `DIR/name.pem` and `DIR/name.key`.
    fn issued(&self, name: &str) -> Issued {
        Issued {
            cert: self.dir.0.join(format!("{name}.pem")),
            key: self.dir.0.join(format!("{name}.key")),
        }
    }
}

/// Python's http.server answering as `DIR/mode` says (see the script).
struct Collector {
    dir: TempDir,
    child: Child,
    port: u16,
    scheme: &'static str,
}

impl Collector {
    fn start() -> Collector {
        Collector::spawn(None)
    }

    /// The same collector behind TLS, serving `certificate`.
    fn start_tls(certificate: &Issued) -> Collector {
        Collector::spawn(Some(certificate))
    }

    fn spawn(tls: Option<&Issued>) -> Collector {
        let dir = TempDir::new("collector");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/webhook_server.py");
        let mut command = Command::new("python3");
        command.arg(script).arg(&dir.0).stdin(Stdio::null());
        if let Some(issued) = tls {
            command.arg("--tls").arg(&issued.cert).arg(&issued.key);
        }
        let child = command.spawn().expect("python3 runs the webhook collector");
        let mut collector = Collector {
            dir,
            child,
            port: 0,
            scheme: if tls.is_some() { "https" } else { "http" },
        };
        let port_file = collector.dir.0.join("port");
        wait_until("the collector listens", Duration::from_secs(10), || {
            fs::read_to_string(&port_file).is_ok_and(|port| !port.is_empty())
        });
        collector.port = fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        collector
    }

    fn url(&self) -> String {
        self.url_for("127.0.0.1")
    }

    /// The URL with `host` for the collector's address.
    fn url_for(&self, host: &str) -> String {
        format!("{}://{host}:{}/accounting", self.scheme, self.port)
    }

    /// The reasons of the TLS handshakes the collector saw fail.
    fn tls_errors(&self) -> String {
        fs::read_to_string(self.dir.0.join("tls_errors")).unwrap_or_default()
    }

    fn set_mode(&self, mode: &str) {
        let temporary = self.dir.0.join("mode.tmp");
        fs::write(&temporary, mode).unwrap();
        fs::rename(temporary, self.dir.0.join("mode")).unwrap();
    }

    fn received(&self) -> Vec<u64> {
        numbers_in(&self.dir.0.join("received"))
    }

    fn connections(&self) -> usize {
        fs::read_to_string(self.dir.0.join("connections")).map_or(0, |text| text.lines().count())
    }

    fn assert_no_protocol_errors(&self) {
        let errors = fs::read_to_string(self.dir.0.join("protocol_errors")).unwrap_or_default();
        assert!(
            errors.is_empty(),
            "the collector saw malformed requests: {errors}"
        );
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn webhook_sink(collector: &Collector, queue: usize) -> Sink {
    let config = SinkConfig {
        webhook: Some(collector.url()),
        webhook_queue: queue,
        webhook_timeout: Duration::from_millis(500),
        ..SinkConfig::default()
    };
    Sink::start_with_backoff(config, quick_backoff()).unwrap()
}

#[test]
fn the_webhook_delivers_every_record_once_in_order_through_failures_and_stalls() {
    let collector = Collector::start();
    let sink = webhook_sink(&collector, 1000);
    let within = Duration::from_secs(30);

    (0..10).for_each(|n| sink.submit(&record(n)));
    wait_until("10 records arrive", within, || {
        collector.received().len() == 10
    });
    assert_eq!(
        collector.connections(),
        1,
        "one kept-alive connection carries them"
    );

    collector.set_mode("fail");
    (10..20).for_each(|n| sink.submit(&record(n)));
    wait_until("503s are retried", within, || {
        sink.stats().webhook_retries >= 3
    });

    collector.set_mode("stall");
    let retries = sink.stats().webhook_retries;
    wait_until("stalled requests time out", within, || {
        sink.stats().webhook_retries >= retries + 2
    });
    (20..30).for_each(|n| sink.submit(&record(n)));

    collector.set_mode("ok");
    wait_until("all 30 arrive", within, || collector.received().len() >= 30);
    assert_eq!(collector.received(), (0..30).collect::<Vec<_>>());

    collector.set_mode("reject");
    sink.submit(&record(30));
    wait_until("422 rejects the record", within, || {
        sink.stats().webhook_rejected == 1
    });
    collector.set_mode("ok");
    sink.submit(&record(31));
    // The collector files a body before it answers: wait for the sink to see the answer.
    wait_until("the next record is delivered", within, || {
        sink.stats().webhook_delivered == 31
    });
    assert_eq!(
        collector.received(),
        (0..30).chain([31]).collect::<Vec<_>>()
    );
    collector.assert_no_protocol_errors();

    let stats = sink.stats();
    assert_eq!(
        (
            stats.webhook_queued,
            stats.webhook_delivered,
            stats.webhook_rejected
        ),
        (32, 31, 1)
    );
    assert_eq!(stats.webhook_dropped, 0);
    assert_eq!(sink.shutdown(Duration::from_secs(1)), 0);
}

#[test]
fn a_full_webhook_queue_drops_and_counts_and_delivers_an_ordered_subsequence() {
    let collector = Collector::start();
    collector.set_mode("fail");
    let sink = webhook_sink(&collector, 2);
    (0..20).for_each(|n| sink.submit(&record(n)));
    let stats = sink.stats();
    // One record at most in the worker's hands, two in the queue.
    assert!((17..=18).contains(&stats.webhook_dropped), "{stats:?}");
    assert_eq!(stats.webhook_dropped + stats.webhook_queued, 20);

    collector.set_mode("ok");
    wait_until("the queued records arrive", Duration::from_secs(30), || {
        sink.stats().webhook_delivered == stats.webhook_queued
    });
    let received = collector.received();
    assert_eq!(received.len() as u64, stats.webhook_queued);
    assert_eq!(
        received.first(),
        Some(&0),
        "the first record found the queue empty"
    );
    assert!(
        received.windows(2).all(|pair| pair[0] < pair[1]),
        "{received:?}"
    );
    collector.assert_no_protocol_errors();
    assert_eq!(sink.shutdown(Duration::from_secs(1)), 0);
}

#[test]
fn shutdown_gives_up_at_the_deadline_and_counts_what_was_not_delivered() {
    let collector = Collector::start();
    collector.set_mode("fail");
    let sink = webhook_sink(&collector, 100);
    (0..5).for_each(|n| sink.submit(&record(n)));
    wait_until("the first attempt fails", Duration::from_secs(10), || {
        sink.stats().webhook_retries >= 1
    });
    let started = Instant::now();
    assert_eq!(sink.shutdown(Duration::from_millis(300)), 5);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(collector.received().is_empty());
}

#[test]
fn a_stuck_webhook_fills_its_queue_without_holding_up_submit_or_the_file() {
    let dir = TempDir::new("stuck");
    // Connections wait in the backlog and are never answered.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = SinkConfig {
        file: Some(dir.0.join("records.jsonl")),
        webhook: Some(format!("http://{}/", listener.local_addr().unwrap())),
        webhook_queue: 3,
        webhook_timeout: Duration::from_secs(1),
        webhook_extra_roots: None,
    };
    let sink = Sink::start_with_backoff(config, quick_backoff()).unwrap();
    let started = Instant::now();
    (0..10).for_each(|n| sink.submit(&record(n)));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "submit waited"
    );
    let stats = sink.stats();
    assert!((6..=7).contains(&stats.webhook_dropped), "{stats:?}");
    assert_eq!(stats.webhook_dropped + stats.webhook_queued, 10);
    wait_until("the file has all 10", Duration::from_secs(10), || {
        numbers_in(&dir.0.join("records.jsonl")).len() == 10
    });
    assert_eq!(sink.shutdown(Duration::ZERO), stats.webhook_queued);
}

#[test]
fn the_file_gets_one_line_per_record_and_follows_a_rename() {
    let dir = TempDir::new("file");
    let path = dir.0.join("records.jsonl");
    fs::write(&path, "{\"n\":100}\n").unwrap();
    let config = SinkConfig {
        file: Some(path.clone()),
        ..SinkConfig::default()
    };
    let sink = Sink::start(config).unwrap();
    let within = Duration::from_secs(10);
    (0..5).for_each(|n| sink.submit(&record(n)));
    wait_until("5 lines are written", within, || {
        numbers_in(&path).len() == 6
    });
    let text = fs::read_to_string(&path).unwrap();
    let second: serde_json::Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        second["note"],
        record(0).note,
        "the newline stays inside the string"
    );

    let rotated = dir.0.join("records.jsonl.1");
    fs::rename(&path, &rotated).unwrap();
    wait_until("the sink reopens the path", within, || path.exists());
    (5..8).for_each(|n| sink.submit(&record(n)));
    wait_until("3 lines in the new file", within, || {
        numbers_in(&path).len() == 3
    });
    assert_eq!(numbers_in(&rotated), [100, 0, 1, 2, 3, 4]);
    assert_eq!(numbers_in(&path), [5, 6, 7]);
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o137, 0, "at most rw-r-----: {mode:o}");
    assert_eq!(sink.stats().file_written, 8);
    assert_eq!(sink.shutdown(Duration::from_secs(1)), 0);
}

#[test]
fn an_unserialisable_record_is_counted_and_goes_nowhere() {
    let dir = TempDir::new("unserialisable");
    let path = dir.0.join("records.jsonl");
    let config = SinkConfig {
        file: Some(path.clone()),
        ..SinkConfig::default()
    };
    let sink = Sink::start(config).unwrap();
    // JSON object keys must be strings.
    sink.submit(&HashMap::from([((1, 2), 3)]));
    sink.submit(&record(1));
    wait_until(
        "the good record is written",
        Duration::from_secs(10),
        || numbers_in(&path) == [1],
    );
    assert_eq!(sink.stats().unserialisable, 1);
    sink.shutdown(Duration::from_secs(1));
}

#[test]
fn start_up_errors_are_one_line_naming_the_cause() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("no/such/dir/records.jsonl");
    let error = Sink::start(SinkConfig {
        file: Some(missing.clone()),
        ..SinkConfig::default()
    })
    .unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains(&*missing.to_string_lossy()), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
    assert!(!message.contains('\n'));

    for (url, queue, cause) in [
        ("ftp://collector/", 10, "must be http:// or https://"),
        ("collector:80", 10, "not a URL"),
        ("http://collector/", 0, "at least one record"),
    ] {
        let error = Sink::start(SinkConfig {
            webhook: Some(url.to_owned()),
            webhook_queue: queue,
            ..SinkConfig::default()
        })
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains(cause) && !message.contains('\n'),
            "{message}"
        );
    }
    let error = Sink::start(SinkConfig {
        webhook: Some("https://collector/".to_owned()),
        webhook_extra_roots: Some(missing.clone()),
        ..SinkConfig::default()
    })
    .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot read the CA bundle")
            && message.contains(&*missing.to_string_lossy()),
        "{message}"
    );
}

/// A sink POSTing to `url`, trusting `ca` besides the system's roots.
fn https_sink(url: String, ca: &Issued) -> Sink {
    let config = SinkConfig {
        webhook: Some(url),
        webhook_queue: 1000,
        webhook_timeout: Duration::from_secs(2),
        webhook_extra_roots: Some(ca.cert.clone()),
        ..SinkConfig::default()
    };
    Sink::start_with_backoff(config, quick_backoff()).unwrap()
}

/// Why one POST to `url`, trusting `ca`, fails.
fn https_failure(url: &str, ca: &Issued) -> String {
    let mut client = Client::new(Endpoint::parse(url).unwrap(), Some(&ca.cert)).unwrap();
    client
        .post(b"{}", Duration::from_secs(5))
        .unwrap_err()
        .to_string()
}

#[test]
fn https_delivers_every_record_in_order_over_one_kept_alive_connection() {
    let Some(pki) = Pki::new("https_delivers_every_record_in_order") else {
        return;
    };
    let ca = pki.ca("trusted");
    let certificate = pki.server("trusted", "collector", "DNS:localhost,IP:127.0.0.1");
    let collector = Collector::start_tls(&certificate);
    // By name: SNI and the certificate's DNS name.
    let sink = https_sink(collector.url_for("localhost"), &ca);
    let within = Duration::from_secs(30);

    (0..10).for_each(|n| sink.submit(&record(n)));
    wait_until("10 records arrive", within, || {
        collector.received().len() == 10
    });
    collector.set_mode("fail");
    (10..20).for_each(|n| sink.submit(&record(n)));
    wait_until("503s are retried", within, || {
        sink.stats().webhook_retries >= 3
    });
    collector.set_mode("ok");
    wait_until("all 20 arrive", within, || collector.received().len() >= 20);
    assert_eq!(collector.received(), (0..20).collect::<Vec<_>>());
    assert_eq!(
        collector.connections(),
        1,
        "one kept-alive TLS connection carries them"
    );
    assert_eq!(collector.tls_errors(), "");
    collector.assert_no_protocol_errors();
    assert_eq!(sink.stats().webhook_delivered, 20);
    assert_eq!(sink.shutdown(Duration::from_secs(1)), 0);
}

#[test]
fn https_to_a_certificate_of_an_untrusted_ca_delivers_nothing_and_retries() {
    let Some(pki) = Pki::new("https_to_a_certificate_of_an_untrusted_ca") else {
        return;
    };
    let trusted = pki.ca("trusted");
    let untrusted = pki.ca("untrusted");
    let certificate = pki.server("untrusted", "collector", "IP:127.0.0.1");
    let collector = Collector::start_tls(&certificate);
    let sink = https_sink(collector.url(), &trusted);
    (0..3).for_each(|n| sink.submit(&record(n)));
    wait_until("handshakes are retried", Duration::from_secs(30), || {
        sink.stats().webhook_retries >= 3
    });
    assert!(collector.received().is_empty());
    assert_eq!(sink.stats().webhook_delivered, 0);
    assert!(
        !collector.tls_errors().is_empty(),
        "the collector saw the handshakes fail"
    );
    let failure = https_failure(&collector.url(), &trusted);
    assert!(failure.contains("certificate not trusted"), "{failure}");
    assert_eq!(sink.shutdown(Duration::ZERO), 3);
    // The same collector, its CA trusted: the handshake was the only thing in the way.
    let sink = https_sink(collector.url(), &untrusted);
    sink.submit(&record(3));
    wait_until("the record arrives", Duration::from_secs(30), || {
        collector.received() == [3]
    });
    assert_eq!(sink.shutdown(Duration::from_secs(1)), 0);
}

#[test]
fn https_to_a_certificate_for_another_name_delivers_nothing() {
    let Some(pki) = Pki::new("https_to_a_certificate_for_another_name") else {
        return;
    };
    let ca = pki.ca("trusted");
    let certificate = pki.server(
        "trusted",
        "other",
        "DNS:collector.other.example,IP:192.0.2.1",
    );
    let collector = Collector::start_tls(&certificate);
    let sink = https_sink(collector.url(), &ca);
    (0..3).for_each(|n| sink.submit(&record(n)));
    wait_until("handshakes are retried", Duration::from_secs(30), || {
        sink.stats().webhook_retries >= 3
    });
    assert!(collector.received().is_empty());
    assert_eq!(sink.stats().webhook_delivered, 0);
    let failure = https_failure(&collector.url(), &ca);
    assert!(
        failure.contains("certificate not valid for 127.0.0.1"),
        "{failure}"
    );
    assert_eq!(sink.shutdown(Duration::ZERO), 3);
}

#[test]
fn a_sink_is_shared_by_the_event_loops() {
    fn shared<T: Send + Sync>() {}
    shared::<Sink>();
    let sink = Sink::start(SinkConfig::default()).unwrap();
    sink.submit(&record(0));
    assert_eq!(sink.stats(), SinkStats::default());
    assert_eq!(sink.shutdown(Duration::ZERO), 0);
}
