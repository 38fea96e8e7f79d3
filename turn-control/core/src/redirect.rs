//! Sending new Allocates elsewhere while the server drains or sheds load: RFC 8489 §10's
//! ALTERNATE-SERVER mechanism, which RFC 8656 §7.2 lets a TURN server use for an Allocate.
//!
//! The 300 (Try Alternate) goes only to a request that passed authentication, signed with
//! the request's key: RFC 8489 §10 has a client that used authentication discard an
//! unauthenticated 300, and it keeps a forger from steering clients away. It carries
//! ALTERNATE-SERVER (§14.15, an address encoded as MAPPED-ADDRESS, not XORed) naming the
//! first configured alternate of the client's address family, and ALTERNATE-DOMAIN (§14.16)
//! when one is configured, for clients over TLS.
//!
//! A 300 without ALTERNATE-SERVER is invalid (§14.15 makes it mandatory), so without an
//! alternate of the client's family the answer is 508 (Insufficient Capacity): RFC 8656 §7.2
//! defines it for an Allocate the server has no capacity for, and its clients (and §7.3)
//! treat it as "try another server", not as a failure of their credentials or quota (486).

use std::net::SocketAddr;

use crate::config::Config;

/// Why an Allocate is redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirect {
    /// The server drains ([`crate::Server::set_draining`]).
    Drain,
    /// The allocations reached [`Config::shed_allocations`].
    Load,
}

/// The code of a redirect that names an alternate.
pub(crate) const TRY_ALTERNATE: u16 = 300;
/// The code of a redirect without an alternate of the client's family.
pub(crate) const NO_ALTERNATE: u16 = 508;

/// Whether a new Allocate is redirected now, and why: draining wins over load.
pub(crate) fn redirect(config: &Config, draining: bool) -> Option<Redirect> {
    if draining {
        return Some(Redirect::Drain);
    }
    let limit = config.shed_allocations?;
    (config.quotas.total() >= limit).then_some(Redirect::Load)
}

/// The first configured alternate of `client`'s address family.
pub(crate) fn alternate(config: &Config, client: SocketAddr) -> Option<SocketAddr> {
    config
        .alternate_servers
        .iter()
        .copied()
        .find(|alternate| alternate.is_ipv4() == client.is_ipv4())
}
