//! The agent's gRPC socket is for root and its `--grpc-group` only: an unprivileged user
//! outside the group is refused (permission denied), a user in the group gets through.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure is a test failure"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use tests::Lab;

/// System users and a group made for one test, removed on drop (also when the test fails).
struct Accounts {
    group: String,
    users: Vec<String>,
}

impl Accounts {
    fn new(prefix: &str) -> Self {
        let group = format!("{prefix}g");
        let mut accounts = Self {
            group: group.clone(),
            users: Vec::new(),
        };
        // Left over by a killed run: remove first.
        accounts.remove();
        tests::run("groupadd", ["-r", &group]).unwrap();
        accounts
    }

    fn add_user(&mut self, name: &str, in_group: bool) {
        let mut args = vec!["-r", "-M", "-s", "/usr/sbin/nologin", "-U"];
        if in_group {
            args.extend(["-G", self.group.as_str()]);
        }
        args.push(name);
        tests::run("useradd", args).unwrap();
        self.users.push(name.to_owned());
    }

    fn remove(&mut self) {
        for user in self.users.drain(..) {
            let _ = Command::new("userdel").arg(&user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `xdp-agent-ctl --socket SOCKET health` as `user` with the given group options.
fn health_as(ctl: &Path, socket: &Path, user: &str, groups: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .args(groups)
        .arg("--")
        .arg(ctl)
        .args(["--timeout", "5", "--socket"])
        .arg(socket)
        .arg("health")
        .output()
        .expect("running setpriv")
}

#[test]
fn socket_refuses_users_outside_its_group() {
    if !tests::privileged() {
        return;
    }
    for tool in ["setpriv", "useradd", "groupadd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {tool} is missing"
            );
            eprintln!("SKIPPED: {tool} missing");
            return;
        }
    }
    let prefix = format!("xts{}", std::process::id());
    let mut accounts = Accounts::new(&prefix);
    let outsider = format!("{prefix}o");
    let member = format!("{prefix}m");
    accounts.add_user(&outsider, false);
    accounts.add_user(&member, true);

    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--grpc-group", &accounts.group])
        .unwrap();
    // The other users must reach the socket's directory and the client binary: only the
    // socket's own mode and group decide.
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = lab.dir().join("xdp-agent-ctl");
    std::fs::copy(tests::workspace_binary("xdp-agent-ctl").unwrap(), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();

    let refused = health_as(&ctl, &socket, &outsider, &["--clear-groups"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an outsider got through: {stderr}"
    );
    assert!(
        stderr.contains("permission denied"),
        "expected permission denied, got: {stderr}"
    );

    let allowed = health_as(&ctl, &socket, &member, &["--init-groups"]);
    assert!(
        allowed.status.success(),
        "a member of {} was refused: {}",
        accounts.group,
        String::from_utf8_lossy(&allowed.stderr)
    );

    // The same member with its supplementary groups dropped is an outsider again.
    let dropped = health_as(&ctl, &socket, &member, &["--clear-groups"]);
    assert!(!dropped.status.success());
}
