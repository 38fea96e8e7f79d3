//! The channel binding as both daemons and the tests hold it, and its one
//! conversion to and from the wire message [`v1::ChannelBinding`].

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::v1;

/// Channel numbers 0x4000 through 0x7FFF: RFC 5766 section 11's range, which
/// turn-control accepts for RFC 5766 clients (RFC 8656 section 12 reserves
/// 0x5000-0x7FFF).
pub const CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x7fff;

/// A channel binding as the data plane relays it: channel data from `client`
/// to `listener` on `channel` goes to `peer` from the relay's
/// `allocation_port`; the peer's datagrams to that port go back to `client`
/// on `channel`, from `listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binding {
    /// The client's transport address as the relay sees it.
    pub client: SocketAddr,
    /// Channel number, 0x4000-0x7FFF.
    pub channel: u16,
    /// The peer's transport address.
    pub peer: SocketAddr,
    /// The allocation's relay port.
    pub allocation_port: u16,
    /// The server transport address the client sends to (a listener; a
    /// wildcard one until the agent resolves it).
    pub listener: SocketAddr,
    /// The allocation asked for DONT-FRAGMENT (RFC 8656 section 7.2): IPv4
    /// datagrams to the peer leave with DF set (nothing to do for an IPv6
    /// peer).
    pub dont_fragment: bool,
}

/// The longest lifetime a binding is installed with: RFC 8656 section 7.2's
/// longest allocation lifetime, which bounds a channel's and a permission's.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// A binding and how long from now the kernel may relay it: until the
/// earliest expiry of its channel, its permission and its allocation; and
/// the rate limits the kernel holds its traffic to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The binding.
    pub binding: Binding,
    /// What is left of its authorisation, 1 ms to [`MAX_LIFETIME`].
    pub lifetime: Duration,
    /// Its allocation's and its user's rate limits, at most [`MAX_RATE_LIMITS`].
    pub rate_limits: Vec<RateLimit>,
}

/// Most rate limits one binding names: its allocation's and its user's.
pub const MAX_RATE_LIMITS: usize = 2;

/// Longest meter name accepted.
pub const MAX_METER_NAME: usize = 256;

/// A rate limit on a binding's traffic ([`v1::RateLimit`]): the meter it is
/// counted against and the meter's rate, application bytes per second in
/// each direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// The meter's name; bindings that name one meter share its rate.
    pub meter: String,
    /// Application bytes per second, each direction, at least 1.
    pub bytes_per_second: u64,
}

/// Why a binding was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// An address field is not `ip:port`.
    #[error("{field} {value:?} is not an address of the form ip:port or [ip]:port")]
    BadAddress {
        /// The field's name.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// Port zero cannot be a transport address.
    #[error("{field} {address} has port 0")]
    ZeroPort {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The address is of a family the relay has no address in.
    #[error("{field} {address} is of a family the relay has no address in")]
    FamilyNotRelayed {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The channel lies outside 0x4000-0x7FFF.
    #[error("channel {0:#06x} is outside 0x4000-0x7fff")]
    ChannelOutOfRange(u32),
    /// The allocation port lies outside the configured range.
    #[error("allocation port {port} is outside the range {low}-{high}")]
    PortOutOfRange {
        /// The port.
        port: u32,
        /// The range's low end.
        low: u16,
        /// The range's high end.
        high: u16,
    },
    /// The address cannot be a real endpoint: unspecified, broadcast or multicast.
    #[error("{field} {address} is not a unicast address")]
    NotUnicast {
        /// The field's name.
        field: &'static str,
        /// The address.
        address: SocketAddr,
    },
    /// The peer is one of the relay's own listeners: relaying to it would loop.
    #[error("peer {0} is one of the relay's listeners")]
    PeerIsListener(SocketAddr),
    /// The listener is not one the data plane is configured with.
    #[error("listener {0} is not a configured listener")]
    UnknownListener(SocketAddr),
    /// A binding to install needs a lifetime within 1 ms to [`MAX_LIFETIME`].
    #[error("lifetime_ms {0} is outside 1-3600000")]
    LifetimeOutOfRange(u32),
    /// More rate limits than a binding can carry, or one without a meter
    /// name or a rate.
    #[error("rate_limits: {0}")]
    RateLimit(String),
    /// A client can only reach a listener of its own family.
    #[error("listener {listener} is not of the family of client {client}")]
    ListenerFamily {
        /// The client.
        client: SocketAddr,
        /// The listener.
        listener: SocketAddr,
    },
}

impl TryFrom<&v1::ChannelBinding> for Binding {
    type Error = BindingError;

    /// Reads a binding's fields: well-formed, but not checked against any
    /// configuration (the agent does that before installing one).
    fn try_from(binding: &v1::ChannelBinding) -> Result<Self, BindingError> {
        let client = parse_address("client", &binding.client)?;
        let peer = parse_address("peer", &binding.peer)?;
        let listener = parse_address("listener", &binding.listener)?;
        let channel = u16::try_from(binding.channel)
            .ok()
            .filter(|channel| CHANNEL_RANGE.contains(channel))
            .ok_or(BindingError::ChannelOutOfRange(binding.channel))?;
        let allocation_port =
            u16::try_from(binding.allocation_port).map_err(|_| BindingError::PortOutOfRange {
                port: binding.allocation_port,
                low: 1,
                high: u16::MAX,
            })?;
        if client.is_ipv4() != listener.is_ipv4() {
            return Err(BindingError::ListenerFamily { client, listener });
        }
        Ok(Self {
            client,
            channel,
            peer,
            allocation_port,
            listener,
            dont_fragment: binding.dont_fragment,
        })
    }
}

/// The wire form of a binding without a lifetime (`lifetime_ms` 0), as a
/// removal sends it.
impl From<&Binding> for v1::ChannelBinding {
    fn from(binding: &Binding) -> Self {
        Self {
            client: binding.client.to_string(),
            channel: u32::from(binding.channel),
            peer: binding.peer.to_string(),
            allocation_port: u32::from(binding.allocation_port),
            listener: binding.listener.to_string(),
            lifetime_ms: 0,
            dont_fragment: binding.dont_fragment,
            usage: None,
            rate_limits: Vec::new(),
        }
    }
}

impl TryFrom<&v1::ChannelBinding> for Lease {
    type Error = BindingError;

    /// Reads a binding and its lifetime, which must be within 1 ms to
    /// [`MAX_LIFETIME`].
    fn try_from(message: &v1::ChannelBinding) -> Result<Self, BindingError> {
        let binding = Binding::try_from(message)?;
        let lifetime = Duration::from_millis(u64::from(message.lifetime_ms));
        if lifetime.is_zero() || lifetime > MAX_LIFETIME {
            return Err(BindingError::LifetimeOutOfRange(message.lifetime_ms));
        }
        if message.rate_limits.len() > MAX_RATE_LIMITS {
            return Err(BindingError::RateLimit(format!(
                "{} given, at most {MAX_RATE_LIMITS}",
                message.rate_limits.len()
            )));
        }
        let rate_limits = message
            .rate_limits
            .iter()
            .map(|limit| {
                if limit.meter.is_empty() || limit.meter.len() > MAX_METER_NAME {
                    return Err(BindingError::RateLimit(format!(
                        "meter name {:?} must be 1 to {MAX_METER_NAME} bytes",
                        limit.meter
                    )));
                }
                if limit.bytes_per_second == 0 {
                    return Err(BindingError::RateLimit(format!(
                        "meter {:?} has a rate of 0 bytes per second",
                        limit.meter
                    )));
                }
                Ok(RateLimit {
                    meter: limit.meter.clone(),
                    bytes_per_second: limit.bytes_per_second,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            binding,
            lifetime,
            rate_limits,
        })
    }
}

/// The wire form of a lease; a lifetime is rounded up to whole milliseconds
/// (a lease of 0.4 ms still reaches the agent as one to install).
impl From<&Lease> for v1::ChannelBinding {
    fn from(lease: &Lease) -> Self {
        let millis = lease.lifetime.as_nanos().div_ceil(1_000_000);
        Self {
            lifetime_ms: u32::try_from(millis).unwrap_or(u32::MAX),
            rate_limits: lease
                .rate_limits
                .iter()
                .map(|limit| v1::RateLimit {
                    meter: limit.meter.clone(),
                    bytes_per_second: limit.bytes_per_second,
                })
                .collect(),
            ..Self::from(&lease.binding)
        }
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} ch {:#06x} <-> {} via port {}",
            self.client, self.listener, self.channel, self.peer, self.allocation_port
        )?;
        if self.dont_fragment {
            f.write_str(" DF")?;
        }
        Ok(())
    }
}

/// Parses `ip:port`, canonicalising `::ffff:a.b.c.d` (the kernel sees such
/// an endpoint as IPv4).
pub fn parse_address(field: &'static str, value: &str) -> Result<SocketAddr, BindingError> {
    let address: SocketAddr = value.parse().map_err(|_| BindingError::BadAddress {
        field,
        value: value.to_owned(),
    })?;
    Ok(SocketAddr::new(address.ip().to_canonical(), address.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(
        client: &str,
        channel: u32,
        peer: &str,
        port: u32,
        listener: &str,
    ) -> v1::ChannelBinding {
        v1::ChannelBinding {
            client: client.into(),
            channel,
            peer: peer.into(),
            allocation_port: port,
            listener: listener.into(),
            lifetime_ms: 0,
            dont_fragment: false,
            ..Default::default()
        }
    }

    #[test]
    fn leases_carry_their_lifetime_both_ways() {
        let mut message = wire(
            "192.0.2.10:40000",
            0x4001,
            "198.51.100.7:9000",
            50000,
            "203.0.113.1:3478",
        );
        message.lifetime_ms = 300_000;
        let lease = Lease::try_from(&message).unwrap();
        assert_eq!(lease.lifetime, Duration::from_secs(300));
        assert_eq!(v1::ChannelBinding::from(&lease), message);
        let rounded = Lease {
            lifetime: Duration::from_micros(400),
            ..lease
        };
        assert_eq!(v1::ChannelBinding::from(&rounded).lifetime_ms, 1);
    }

    #[test]
    fn a_lease_needs_a_lifetime_within_range() {
        let mut message = wire(
            "192.0.2.10:40000",
            0x4001,
            "198.51.100.7:9000",
            50000,
            "203.0.113.1:3478",
        );
        for (lifetime_ms, valid) in [(0, false), (1, true), (3_600_000, true), (3_600_001, false)] {
            message.lifetime_ms = lifetime_ms;
            assert_eq!(
                Lease::try_from(&message).map(|lease| lease.lifetime),
                if valid {
                    Ok(Duration::from_millis(u64::from(lifetime_ms)))
                } else {
                    Err(BindingError::LifetimeOutOfRange(lifetime_ms))
                },
                "{lifetime_ms}"
            );
        }
    }

    #[test]
    fn bindings_round_trip_through_the_wire() {
        let message = wire(
            "[2001:db8:1::10]:40000",
            0x4001,
            "198.51.100.7:9000",
            50000,
            "[2001:db8::1]:443",
        );
        let binding = Binding::try_from(&message).unwrap();
        assert_eq!(binding.channel, 0x4001);
        assert_eq!(v1::ChannelBinding::from(&binding), message);
    }

    #[test]
    fn dont_fragment_round_trips_and_tells_bindings_apart() {
        let mut message = wire(
            "192.0.2.10:40000",
            0x4001,
            "198.51.100.7:9000",
            50000,
            "203.0.113.1:3478",
        );
        let plain = Binding::try_from(&message).unwrap();
        assert!(!plain.dont_fragment);
        message.dont_fragment = true;
        let binding = Binding::try_from(&message).unwrap();
        assert!(binding.dont_fragment);
        assert_ne!(binding, plain);
        assert_eq!(v1::ChannelBinding::from(&binding), message);
        message.lifetime_ms = 1000;
        let lease = Lease::try_from(&message).unwrap();
        assert!(lease.binding.dont_fragment);
        assert_eq!(v1::ChannelBinding::from(&lease), message);
        assert_eq!(
            binding.to_string(),
            "192.0.2.10:40000 -> 203.0.113.1:3478 ch 0x4001 <-> 198.51.100.7:9000 via port 50000 DF"
        );
        assert!(!plain.to_string().ends_with("DF"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_canonicalised() {
        let binding = Binding::try_from(&wire(
            "[::ffff:192.0.2.10]:40000",
            0x4001,
            "198.51.100.7:9000",
            50000,
            "203.0.113.1:3478",
        ))
        .unwrap();
        assert_eq!(binding.client, "192.0.2.10:40000".parse().unwrap());
    }

    #[test]
    fn malformed_fields_are_named() {
        let refuse = |m: v1::ChannelBinding| Binding::try_from(&m).unwrap_err();
        let (peer, listener) = ("198.51.100.7:9000", "203.0.113.1:3478");
        assert!(matches!(
            refuse(wire("nonsense", 0x4001, peer, 50000, listener)),
            BindingError::BadAddress {
                field: "client",
                ..
            }
        ));
        assert!(matches!(
            refuse(wire("192.0.2.1:1", 0x4001, peer, 50000, "")),
            BindingError::BadAddress {
                field: "listener",
                ..
            }
        ));
        assert_eq!(
            refuse(wire("192.0.2.1:1", 0x3fff, peer, 50000, listener)),
            BindingError::ChannelOutOfRange(0x3fff)
        );
        assert_eq!(
            refuse(wire("192.0.2.1:1", 0x1_4001, peer, 50000, listener)),
            BindingError::ChannelOutOfRange(0x1_4001)
        );
        assert!(matches!(
            refuse(wire("192.0.2.1:1", 0x4001, peer, 70000, listener)),
            BindingError::PortOutOfRange { .. }
        ));
        assert!(matches!(
            refuse(wire("192.0.2.1:1", 0x4001, peer, 50000, "[::]:3478")),
            BindingError::ListenerFamily { .. }
        ));
    }
}
