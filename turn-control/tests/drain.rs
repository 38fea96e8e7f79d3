//! Draining and load shedding against the real daemon on loopback: the admin endpoints
//! (`--admin`), POST /drain, SIGUSR1 and `turn-control drain --wait`; new Allocates get 300
//! (Try Alternate) with ALTERNATE-SERVER while allocations made before keep relaying; the
//! daemon exits 0 once the last one is gone; `--shed-allocations`.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Daemon, free_port};
use tests_harness::coturn::tools_present;
use tests_harness::stun::{self, attr, method};
use webrtc_util::Conn as _;

const T: Duration = Duration::from_secs(10);
const ALTERNATE: &str = "127.0.0.2:3479";
/// ALTERNATE-SERVER of [`ALTERNATE`]: not XORed, family 1, port 3479, 127.0.0.2.
const ALTERNATE_VALUE: [u8; 8] = [0, 1, 0x0d, 0x97, 127, 0, 0, 2];

/// A daemon with an admin server and the alternate, and the admin address.
fn daemon(extra: &[&str]) -> (Daemon, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let admin_arg = admin.to_string();
    let mut args = vec![
        "--dev",
        "--user",
        "test:testpass",
        "--threads",
        "2",
        "--admin",
        &admin_arg,
        "--alternate-server",
        ALTERNATE,
    ];
    args.extend_from_slice(extra);
    (Daemon::start("127.0.0.1", &args), admin)
}

/// `method path` to the admin server: status code and body.
fn http(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

fn stun_client(daemon: &Daemon) -> stun::Client {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    stun::Client::new(socket, daemon.listen, "test", "testpass", None).unwrap()
}

/// Asserts that a new Allocate gets 300 naming [`ALTERNATE`].
fn assert_redirected(daemon: &Daemon) {
    let answer = stun_client(daemon).allocate().unwrap();
    assert_eq!(answer.error_code(), Some(300), "{answer:?}");
    assert_eq!(answer.attr(0x8023), Some(&ALTERNATE_VALUE[..]));
}

fn delete(client: &mut stun::Client) {
    let answer = client
        .request(method::REFRESH, |m| m.attr(attr::LIFETIME, &[0, 0, 0, 0]))
        .unwrap();
    assert_eq!(answer.error_code(), None, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_made_before_the_drain_keeps_relaying_and_the_daemon_exits_after_it() {
    let (mut daemon, admin) = daemon(&[]);
    assert_eq!(http(admin, "GET", "/healthz"), (200, "ok\n".to_owned()));
    let (code, body) = http(admin, "GET", "/readyz");
    assert_eq!(
        (code, body.as_str()),
        (200, "ready; no agent (user-space relaying)\n")
    );
    let client = common::turn_client(daemon.listen, "test", "testpass").await;
    let relay = client.allocate().await.expect("allocate");
    daemon.wait_metric("turn_ready", |v| v == 1.0, T);

    let (code, body) = http(admin, "POST", "/drain");
    assert_eq!(
        (code, body.as_str()),
        (202, "{\"draining\":true,\"allocations\":1}\n")
    );
    assert_eq!(http(admin, "GET", "/drain").0, 200);
    let (code, body) = http(admin, "GET", "/readyz");
    assert_eq!(code, 503);
    assert!(body.starts_with("draining"), "{body}");
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    assert_eq!(http(admin, "GET", "/nothing").0, 404);
    assert_eq!(http(admin, "PUT", "/drain").0, 405);

    // The allocation made before relays both ways.
    common::echo(&relay, "before the drain", 3, T).await;
    // A new Allocate is redirected; the webrtc-rs client reports it as an error.
    assert_redirected(&daemon);
    let other = common::turn_client(daemon.listen, "test", "testpass").await;
    let error = match other.allocate().await {
        Ok(_) => panic!("an Allocate succeeded while draining"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("300"), "{error}");
    other.close().await.unwrap();
    daemon.wait_metric("turn_draining", |v| v == 1.0, T);
    daemon.wait_metric("turn_ready", |v| v == 0.0, T);
    daemon.wait_metric("turn_redirects_total{reason=\"drain\"}", |v| v >= 2.0, T);

    // Refresh with LIFETIME 0 deletes the last allocation: the daemon exits by itself.
    relay.close().await.unwrap();
    client.close().await.unwrap();
    let status = daemon.wait_exit(T);
    assert!(status.success(), "{status:?}\n{}", daemon.output());
    daemon.wait_for_log("no allocation left", T);
}

#[test]
fn the_drain_subcommand_waits_until_the_daemon_has_exited() {
    let (mut daemon, admin) = daemon(&[]);
    let mut client = stun_client(&daemon);
    assert_eq!(client.allocate().unwrap().error_code(), None);
    let mut drain = Command::new(BIN)
        .args(["drain", "--admin", &admin.to_string(), "--wait"])
        .env_remove("TURN_CONTROL_ADMIN")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        drain.try_wait().unwrap().is_none(),
        "drain --wait returned early"
    );
    // The allocation still refreshes, then goes.
    assert_eq!(
        client
            .request(method::REFRESH, |m| m.attr(attr::LIFETIME, &[0, 0, 2, 88]))
            .unwrap()
            .error_code(),
        None
    );
    assert_redirected(&daemon);
    delete(&mut client);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = drain.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "drain --wait did not return");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(daemon.wait_exit(T).success());
}

#[test]
fn the_drain_subcommand_fails_in_one_line_without_a_daemon() {
    let admin = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let (status, _, stderr) = common::run_to_exit(&["drain", "--admin", &admin], &[]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach the daemon's admin server"),
        "{stderr}"
    );
}

#[test]
fn a_busy_admin_address_is_a_start_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = busy.local_addr().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let (status, _, stderr) = common::run_to_exit(
        &[
            "--dev",
            "--listen",
            &listen,
            "--metrics",
            "127.0.0.1:0",
            "--admin",
            &admin,
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("admin listener {admin}")),
        "{stderr}"
    );
}

#[test]
fn sigusr1_drains_and_an_idle_daemon_exits_at_once() {
    let (mut daemon, admin) = daemon(&[]);
    let mut client = stun_client(&daemon);
    assert_eq!(client.allocate().unwrap().error_code(), None);
    daemon.signal("USR1");
    daemon.wait_metric("turn_draining", |v| v == 1.0, T);
    assert_eq!(http(admin, "GET", "/readyz").0, 503);
    assert_redirected(&daemon);
    delete(&mut client);
    assert!(daemon.wait_exit(T).success());
}

#[test]
fn the_third_allocate_is_shed_at_two() {
    let (daemon, admin) = daemon(&["--shed-allocations", "2"]);
    let (mut one, mut two) = (stun_client(&daemon), stun_client(&daemon));
    assert_eq!(one.allocate().unwrap().error_code(), None);
    assert_eq!(two.allocate().unwrap().error_code(), None);
    assert_redirected(&daemon);
    daemon.wait_metric("turn_redirects_total{reason=\"load\"}", |v| v == 1.0, T);
    // Shedding is not draining: the relay stays ready and serves again below the threshold.
    assert_eq!(http(admin, "GET", "/readyz").0, 200);
    delete(&mut one);
    assert_eq!(stun_client(&daemon).allocate().unwrap().error_code(), None);
    delete(&mut two);
}

#[test]
fn coturn_uclient_against_a_draining_relay_fails() {
    let test = "coturn_uclient_against_a_draining_relay_fails";
    if !tools_present(test) {
        return;
    }
    let (daemon, admin) = daemon(&[]);
    // One allocation keeps the daemon draining instead of exiting.
    let mut holder = stun_client(&daemon);
    assert_eq!(holder.allocate().unwrap().error_code(), None);
    assert_eq!(http(admin, "POST", "/drain").0, 202);
    let out = Command::new("turnutils_uclient")
        .args(["-u", "test", "-w", "testpass", "-y", "-n", "1", "-m", "1"])
        .args(["-p", &daemon.listen.port().to_string(), "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{output}");
    assert!(
        !out.status.success() || output.contains("300"),
        "{:?}\n{output}",
        out.status
    );
    daemon.wait_metric("turn_redirects_total{reason=\"drain\"}", |v| v >= 1.0, T);
    delete(&mut holder);
}
