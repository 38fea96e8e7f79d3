//! The binary's command line: configuration errors give one clear line and a non-zero exit;
//! precedence flags > environment > file > defaults; SIGTERM drains and exits 0; SIGHUP
//! reloads users without dropping allocations.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Daemon, TempFile, free_port, run_to_exit};

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr, got:\n{stderr}"
    );
    lines[0]
}

#[test]
fn bad_config_file_names_the_key() {
    let file = TempFile::new("realm = \"example.org\"\nports = \"50000-70000\"\n");
    let (status, _, stderr) = run_to_exit(&["--config", file.path()], &[]);
    assert!(!status.success());
    assert_eq!(
        one_line(&stderr),
        format!(
            "turn-control: config file {}: key \"ports\": 70000 is not a port",
            file.path()
        )
    );

    let file = TempFile::new("relam = \"typo\"\n");
    let (status, _, stderr) = run_to_exit(&["--config", file.path()], &[]);
    assert!(!status.success());
    assert!(
        one_line(&stderr).ends_with("unknown key \"relam\""),
        "{stderr}"
    );

    let file = TempFile::new("realm = \n");
    let (status, _, stderr) = run_to_exit(&["--config", file.path()], &[]);
    assert!(!status.success());
    assert!(one_line(&stderr).contains(": line 1: "), "{stderr}");

    let (status, _, stderr) = run_to_exit(&["--config", "/nonexistent/turn.toml"], &[]);
    assert!(!status.success());
    assert!(
        one_line(&stderr).starts_with("turn-control: config file /nonexistent/turn.toml: "),
        "{stderr}"
    );
}

#[test]
fn unknown_flag_and_bad_values() {
    let (status, _, stderr) = run_to_exit(&["--no-such-flag"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        one_line(&stderr).starts_with("turn-control: unexpected argument '--no-such-flag'"),
        "{stderr}"
    );

    let (status, _, stderr) = run_to_exit(&["--ports", "1-70000"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        one_line(&stderr).contains("70000 is not a port"),
        "{stderr}"
    );

    let (status, _, stderr) = run_to_exit(&["--relay-ip", "192.0.2.1"], &[]);
    assert!(!status.success());
    assert!(
        one_line(&stderr).starts_with("turn-control: users: no credentials"),
        "{stderr}"
    );
}

#[test]
fn busy_port() {
    // Bound first, on a port the kernel picks: no other test can take it.
    let busy = UdpSocket::bind(("127.0.0.1", 0)).unwrap();
    let port = busy.local_addr().unwrap().port();
    let metrics = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let (status, _, stderr) = run_to_exit(
        &[
            "--dev",
            "--listen",
            &listen,
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ],
        &[],
    );
    assert!(!status.success());
    let line = one_line(&stderr);
    assert!(
        line.starts_with(&format!("turn-control: listen udp {listen}: ")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");

    // A busy metrics port, too.
    let busy_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = busy_tcp.local_addr().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let (status, _, stderr) =
        run_to_exit(&["--dev", "--listen", &listen, "--metrics", &metrics], &[]);
    assert!(!status.success());
    assert!(
        one_line(&stderr).starts_with(&format!("turn-control: metrics listener {metrics}: ")),
        "{stderr}"
    );
}

#[test]
fn precedence_flags_env_file_defaults() {
    let file = TempFile::new(
        "realm = \"file.example\"\nports = \"40000-40100\"\nusers = [\"alice:pw\"]\nlisten = [\"127.0.0.1:3478\"]\n",
    );
    let print = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--print-config", "--config", file.path()];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = run_to_exit(&all, env);
        assert!(status.success(), "{stderr}");
        stdout
    };
    let out = print(&[], &[]);
    assert!(out.contains("realm = \"file.example\""), "{out}");
    assert!(out.contains("ports = \"40000-40100\""), "{out}");
    assert!(out.contains("log_format = \"text\""), "default: {out}");
    assert!(!out.contains("alice:pw"), "passwords are redacted: {out}");

    let out = print(&[], &[("TURN_CONTROL_REALM", "env.example")]);
    assert!(
        out.contains("realm = \"env.example\""),
        "env over file: {out}"
    );
    assert!(out.contains("ports = \"40000-40100\""), "{out}");

    let out = print(
        &["--realm", "flag.example"],
        &[("TURN_CONTROL_REALM", "env.example")],
    );
    assert!(
        out.contains("realm = \"flag.example\""),
        "flag over env: {out}"
    );

    // SOFTWARE is an option like any other: default, file key, flag.
    assert!(out.contains("software = \"turn-control "), "default: {out}");
    let with_software = TempFile::new("users = [\"a:b\"]\nsoftware = \"file relay\"\n");
    let (status, out, stderr) = run_to_exit(
        &["--print-config", "--dev", "--config", with_software.path()],
        &[],
    );
    assert!(status.success(), "{stderr}");
    assert!(out.contains("software = \"file relay\""), "{out}");
    let (status, out, stderr) = run_to_exit(
        &[
            "--print-config",
            "--dev",
            "--config",
            with_software.path(),
            "--software",
            "flag relay",
        ],
        &[],
    );
    assert!(status.success(), "{stderr}");
    assert!(out.contains("software = \"flag relay\""), "{out}");

    // The config file itself may come from the environment.
    let (status, out, stderr) =
        run_to_exit(&["--print-config"], &[("TURN_CONTROL_CONFIG", file.path())]);
    assert!(status.success(), "{stderr}");
    assert!(out.contains("realm = \"file.example\""), "{out}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut daemon = Daemon::start("127.0.0.1", &["--dev"]);
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", daemon.log.join("\n"));
    assert!(daemon.log.iter().any(|l| l.contains("drained, exiting")));
    // Not a terminal: no colour sequences for journald or a log file to keep as text.
    assert!(!daemon.output().contains('\x1b'), "{}", daemon.output());
}

#[test]
fn dev_mode_prints_a_credential() {
    let mut daemon = Daemon::start("127.0.0.1", &["--dev"]);
    let password = daemon.dev_password();
    assert_eq!(password.len(), 24);
    assert!(
        daemon.stdout.iter().any(|l| l.trim() == "username: dev"),
        "{:?}",
        daemon.stdout
    );
}

#[test]
fn sighup_reloads_users() {
    let file = TempFile::new("users = [\"alice:one\"]\n");
    let mut daemon = Daemon::start("127.0.0.1", &["--config", file.path()]);
    std::fs::write(&file.0, "users = [\"bob:two\"]\nrealm = \"turn-control\"\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(10));
    daemon.wait_metric(
        "turn_config_reloads_total{result=\"ok\"}",
        |v| v == 1.0,
        Duration::from_secs(5),
    );

    std::fs::write(&file.0, "users = [\"bob:two\"]\nports = \"1-70000\"\n").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("reload failed", Duration::from_secs(10));
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(10)).success());
}

/// The SOFTWARE attribute (RFC 8489 §14.14) of a Binding response carries `--software`.
#[test]
fn binding_response_carries_the_configured_software() {
    const SOFTWARE: u16 = 0x8022;
    let daemon = Daemon::start("127.0.0.1", &["--dev", "--software", "cli-test relay"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A Binding request: type 0x0001, no attributes, the magic cookie, a transaction id.
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(b"software-id!");
    socket.send_to(&request, daemon.listen).unwrap();
    let mut buf = [0u8; 1500];
    let (len, _) = socket.recv_from(&mut buf).unwrap();
    let response = &buf[..len];
    assert_eq!(&response[..2], [0x01, 0x01], "not a Binding success");
    let mut attributes = &response[20..];
    let mut software = None;
    while attributes.len() >= 4 {
        let kind = u16::from_be_bytes([attributes[0], attributes[1]]);
        let length = usize::from(u16::from_be_bytes([attributes[2], attributes[3]]));
        let value = &attributes[4..4 + length];
        if kind == SOFTWARE {
            software = Some(String::from_utf8_lossy(value).into_owned());
        }
        attributes = &attributes[(4 + length).next_multiple_of(4).min(attributes.len())..];
    }
    assert_eq!(software.as_deref(), Some("cli-test relay"));
}
