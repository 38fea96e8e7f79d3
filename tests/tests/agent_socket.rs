//! Who may use the agent's gRPC socket. Two gates: the socket's mode (0660) and
//! `--grpc-group` let the kernel refuse other users at connect(2); the agent then checks
//! the peer credentials (SO_PEERCRED) of every connection it accepts and closes those of
//! anyone but root, its own user and `--grpc-user`, or without it a peer whose primary
//! group is the socket's (SO_PEERCRED carries no supplementary groups). Each refusal is
//! logged and counted in `xdp_agent_grpc_refused_connections_total{reason}`.
//!
//! The clients run as numeric users and groups that no account holds, through
//! `setpriv`, so nothing is added to the system's user database.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure is a test failure"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tests::agent::Agent;
use tests::{AGENT_METRICS, Lab, sample, wait_for};

/// The socket's group.
const GROUP: u32 = 61_001;
/// Another group.
const OTHER_GROUP: u32 = 61_002;
/// The user of `--grpc-user`.
const USER: u32 = 61_010;
/// Another user.
const OTHER_USER: u32 = 61_011;

/// Whether setpriv is there; without it the test is skipped, or fails under `CI=true`.
fn setpriv_found() -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v setpriv"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but setpriv is missing"
        );
        eprintln!("SKIPPED: setpriv missing");
    }
    found
}

/// Starts the agent with `args` and metrics, and lets other users reach its socket's
/// directory and a copy of `xdp-agent-ctl`: only the socket's own mode and group, and
/// the agent, decide. The socket and the copy.
fn start(lab: &mut Lab, args: &[&str]) -> (PathBuf, PathBuf) {
    let mut all = vec!["--metrics", AGENT_METRICS];
    all.extend(args);
    let socket = lab.start_xdp_agent(&all).unwrap();
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = lab.dir().join("xdp-agent-ctl");
    std::fs::copy(tests::workspace_binary("xdp-agent-ctl").unwrap(), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    (socket, ctl)
}

/// Runs `xdp-agent-ctl --socket SOCKET health` as user `uid` with primary group `gid`
/// and the supplementary `groups` only.
fn health_as(ctl: &Path, socket: &Path, uid: u32, gid: u32, groups: &[u32]) -> Output {
    let groups = match groups {
        [] => "--clear-groups".to_owned(),
        some => format!(
            "--groups={}",
            some.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups)
        .arg("--")
        .arg(ctl)
        .args(["--timeout", "5", "--socket"])
        .arg(socket)
        .arg("health")
        .output()
        .expect("running setpriv")
}

/// The connections the agent has refused for `reason`, as its metrics say.
fn refused(lab: &Lab, reason: &str) -> f64 {
    let body = Lab::scrape(&lab.relay, AGENT_METRICS).unwrap();
    let labels = format!("reason=\"{reason}\"");
    sample(&body, "xdp_agent_grpc_refused_connections_total", &labels)
        .unwrap_or_else(|| panic!("no refusals counted for {reason}:\n{body}"))
}

/// Waits until the agent has refused more than `before` connections for
/// `reason` (a client may try more than once: its channel reconnects).
fn wait_refused(lab: &Lab, reason: &str, before: f64) {
    let counted = wait_for(
        &format!("more than {before} connections refused for {reason}"),
        Duration::from_secs(5),
        || Ok((refused(lab, reason) > before).then_some(())),
    );
    if let Err(error) = counted {
        panic!("{error:#}\n{}", lab.log("xdp-agent"));
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn socket_refuses_users_outside_its_group() {
    if !tests::privileged() || !setpriv_found() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (socket, ctl) = start(&mut lab, &["--grpc-group", &GROUP.to_string()]);
    assert_eq!(refused(&lab, "group"), 0.0);

    // The kernel refuses an outsider at connect(2): the socket is 0660.
    let outsider = health_as(&ctl, &socket, OTHER_USER, OTHER_GROUP, &[]);
    assert!(!outsider.status.success(), "an outsider got through");
    assert!(
        stderr(&outsider).contains("permission denied"),
        "expected permission denied, got: {}",
        stderr(&outsider)
    );

    // Of the group as its primary group: served.
    let member = health_as(&ctl, &socket, OTHER_USER, GROUP, &[]);
    assert!(
        member.status.success(),
        "a member of {GROUP} was refused: {}",
        stderr(&member)
    );

    // Of the group through a supplementary group alone: the socket's mode lets it
    // connect, but its peer credentials do not show the group, and the agent refuses.
    let supplementary = health_as(&ctl, &socket, OTHER_USER, OTHER_GROUP, &[GROUP]);
    assert!(
        !supplementary.status.success(),
        "a supplementary member got through"
    );
    wait_refused(&lab, "group", 0.0);
    // Counted, then logged.
    let logged = wait_for("the refusal in the log", Duration::from_secs(5), || {
        let log = lab.log("xdp-agent");
        Ok(
            (log.contains("gRPC connection refused") && log.contains(&format!("uid={OTHER_USER}")))
                .then_some(()),
        )
    });
    assert!(logged.is_ok(), "{}", lab.log("xdp-agent"));

    // A socket whose mode is loosened still reaches no one else.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let before = refused(&lab, "group");
    let loosened = health_as(&ctl, &socket, OTHER_USER, OTHER_GROUP, &[]);
    assert!(!loosened.status.success(), "an outsider got through 0666");
    wait_refused(&lab, "group", before);

    // Root is served.
    Agent::connect(&socket).unwrap().health().unwrap();
}

#[test]
fn grpc_user_serves_that_user_alone_of_its_group() {
    if !tests::privileged() || !setpriv_found() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (socket, ctl) = start(
        &mut lab,
        &[
            "--grpc-group",
            &GROUP.to_string(),
            "--grpc-user",
            &USER.to_string(),
        ],
    );

    // In the socket's group, as its primary group, but another user.
    let other = health_as(&ctl, &socket, OTHER_USER, GROUP, &[]);
    assert!(
        !other.status.success(),
        "another user of the group got through"
    );
    // xdp-agent-ctl says why the agent may have closed the connection.
    assert!(
        stderr(&other).contains("closed the connection") && stderr(&other).contains("--grpc-user"),
        "{}",
        stderr(&other)
    );
    wait_refused(&lab, "user", 0.0);
    assert_eq!(refused(&lab, "group"), 0.0);

    let user = health_as(&ctl, &socket, USER, GROUP, &[]);
    assert!(
        user.status.success(),
        "--grpc-user was refused: {}",
        stderr(&user)
    );
    Agent::connect(&socket).unwrap().health().unwrap();
    // Not one of their connections refused (a client's channel may connect more than
    // once). The log names the uid of each refusal; counting refusals instead would race
    // with the other user's queued connections, which the agent may still be refusing.
    let log = lab.log("xdp-agent");
    let refused_uids: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("gRPC connection refused"))
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with("uid="))
        })
        .collect();
    assert!(
        refused_uids
            .iter()
            .all(|uid| *uid == format!("uid={OTHER_USER}")),
        "the user and root are served; refused: {refused_uids:?}\n{log}"
    );
}
