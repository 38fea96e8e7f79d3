//! The gRPC unix socket and who may use it.
//!
//! Two gates: the socket's mode (0660) and group let the kernel refuse other users at
//! connect(2); then the agent reads the credentials of every connection it accepts
//! (`SO_PEERCRED`: the peer's uid and primary gid when it connected) and closes those of
//! anyone but root, the agent's own user and the user or group it serves ([`Access`]), so
//! that a socket whose mode or directory is loosened, or a connection handed on, still
//! reaches no one else. `SO_PEERCRED` carries no supplementary groups: a member of the
//! group through a supplementary group passes the socket's mode but is refused here;
//! the served group must be the client's primary group (turn-control.service's `Group=`).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use nix::unistd::{Gid, Group, Uid, User};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tracing::warn;

/// Whose connections the agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The agent's own user: whoever runs as it can reach the maps anyway.
    own: Uid,
    /// `--grpc-user`: when given, the one user served besides root and the agent's own,
    /// whatever its group.
    user: Option<Uid>,
    /// The socket's group: without `user`, a peer whose primary group it is is served.
    group: Gid,
}

/// Counter: connections closed unserved, by `reason` ([`Refusal::name`]).
/// Defined here rather than with the other names in `metrics`, which serves
/// it at zero for every reason: this module counts it.
pub const REFUSED_CONNECTIONS: &str = "xdp_agent_grpc_refused_connections_total";

/// Why a connection was closed unserved; the label of
/// `xdp_agent_grpc_refused_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The kernel could not say who connected.
    #[error("its credentials are unknown")]
    Credentials,
    /// `--grpc-user` is given and the peer is another user.
    #[error("the peer is neither root, the agent's user nor --grpc-user")]
    User,
    /// The peer's primary group is not the socket's.
    #[error(
        "the peer is neither root nor the agent's user, and its primary group is not the socket's"
    )]
    Group,
}

impl Refusal {
    /// Every reason, for the metric's zero samples.
    pub const ALL: [Refusal; 3] = [Refusal::Credentials, Refusal::User, Refusal::Group];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Credentials => "credentials",
            Refusal::User => "user",
            Refusal::Group => "group",
        }
    }
}

impl Access {
    /// Serves root, the agent's own user and `user`, or without `user` any peer whose
    /// primary group is `group`.
    pub fn new(user: Option<Uid>, group: Gid) -> Self {
        Self {
            own: Uid::effective(),
            user,
            group,
        }
    }

    /// What `--grpc-user` and `--grpc-group` (names or numbers) say; the group defaults
    /// to the agent's.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> anyhow::Result<Self> {
        let user = user.map(resolve_user).transpose()?;
        let group = group.map(resolve_group).transpose()?;
        Ok(Self::new(user, group.unwrap_or_else(Gid::effective)))
    }

    /// The socket's group.
    pub fn group(&self) -> Gid {
        self.group
    }

    /// Whether a peer of user `uid` and primary group `gid` is served.
    pub fn check(&self, uid: u32, gid: u32) -> Result<(), Refusal> {
        let uid = Uid::from_raw(uid);
        if uid.is_root() || uid == self.own {
            return Ok(());
        }
        match self.user {
            Some(user) if uid == user => Ok(()),
            Some(_) => Err(Refusal::User),
            None if Gid::from_raw(gid) == self.group => Ok(()),
            None => Err(Refusal::Group),
        }
    }

    /// Whether the peer of `stream` is served; a refusal is counted and logged.
    pub fn admit(&self, stream: &UnixStream) -> Result<(), Refusal> {
        let (result, uid, gid, pid) = match stream.peer_cred() {
            Ok(cred) => (
                self.check(cred.uid(), cred.gid()),
                Some(cred.uid()),
                Some(cred.gid()),
                cred.pid(),
            ),
            Err(_) => (Err(Refusal::Credentials), None, None, None),
        };
        if let Err(refusal) = result {
            metrics::counter!(REFUSED_CONNECTIONS, "reason" => refusal.name()).increment(1);
            warn!(
                uid,
                gid,
                pid,
                reason = refusal.name(),
                "gRPC connection refused: {refusal}"
            );
        }
        result
    }
}

/// The connections of `listener` that `access` admits; the others are dropped (closed)
/// as they arrive.
pub fn admitted(
    listener: UnixListener,
    access: Access,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    UnixListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Ok(stream) => access.admit(&stream).is_ok().then_some(Ok(stream)),
        Err(error) => Some(Err(error)),
    })
}

/// Binds the gRPC socket with mode 0660 and `group`, replacing a stale socket left by a
/// previous run (but never another kind of file).
pub fn bind(path: &Path, group: Gid) -> anyhow::Result<UnixListener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if group != Gid::effective() {
        nix::unistd::chown(path, None, Some(group))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    Ok(listener)
}

/// A user by name, or by number (a number wins over a user named like it).
fn resolve_user(text: &str) -> anyhow::Result<Uid> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    Ok(User::from_name(text)
        .with_context(|| format!("cannot look up user {text}"))?
        .with_context(|| format!("no user named {text}"))?
        .uid)
}

/// A group by name, or by number (a number wins over a group named like it).
fn resolve_group(text: &str) -> anyhow::Result<Gid> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    Ok(Group::from_name(text)
        .with_context(|| format!("cannot look up group {text}"))?
        .with_context(|| format!("no group named {text}"))?
        .gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent running as 900:900, so that root and its own user are told apart.
    fn access(user: Option<u32>, group: u32) -> Access {
        Access {
            own: Uid::from_raw(900),
            user: user.map(Uid::from_raw),
            group: Gid::from_raw(group),
        }
    }

    #[test]
    fn the_group_serves_its_primary_members_without_a_user() {
        let access = access(None, 1000);
        assert_eq!(access.check(0, 0), Ok(()), "root");
        assert_eq!(access.check(900, 5), Ok(()), "the agent's own user");
        assert_eq!(access.check(1001, 1000), Ok(()));
        assert_eq!(access.check(1001, 1001), Err(Refusal::Group));
    }

    #[test]
    fn a_user_narrows_the_group_to_itself() {
        let access = access(Some(1001), 1000);
        assert_eq!(access.check(0, 1000), Ok(()), "root");
        assert_eq!(access.check(900, 900), Ok(()), "the agent's own user");
        assert_eq!(access.check(1001, 1000), Ok(()));
        assert_eq!(access.check(1001, 7), Ok(()), "its group does not matter");
        assert_eq!(access.check(1002, 1000), Err(Refusal::User));
    }

    #[test]
    fn names_and_numbers_resolve() {
        let root = Access::resolve(Some("root"), Some("0")).unwrap();
        assert_eq!(
            (root.user, root.group),
            (Some(Uid::from_raw(0)), Gid::from_raw(0))
        );
        let numbers = Access::resolve(Some("4242"), Some("4343")).unwrap();
        assert_eq!(
            (numbers.user, numbers.group),
            (Some(Uid::from_raw(4242)), Gid::from_raw(4343))
        );
        assert_eq!(Access::resolve(None, None).unwrap().group, Gid::effective());
        let error = Access::resolve(Some("no-such-user-here"), None).unwrap_err();
        assert_eq!(error.to_string(), "no user named no-such-user-here");
        let error = Access::resolve(None, Some("no-such-group-here")).unwrap_err();
        assert_eq!(error.to_string(), "no group named no-such-group-here");
    }

    #[tokio::test]
    async fn connections_are_judged_by_their_peer_credentials() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let uid = Uid::effective().as_raw();
        let gid = Gid::effective().as_raw();
        // This process is the agent and the peer alike: its own user is served.
        assert_eq!(
            Access::new(None, Gid::from_raw(gid + 1)).admit(&ours),
            Ok(())
        );
        let stranger = Access {
            own: Uid::from_raw(uid.wrapping_add(1)),
            ..Access::new(Some(Uid::from_raw(uid.wrapping_add(2))), Gid::from_raw(gid))
        };
        if uid != 0 {
            assert_eq!(stranger.admit(&ours), Err(Refusal::User));
        }
    }
}
