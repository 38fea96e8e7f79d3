//! The data-plane configuration as the agent keeps it: what flags and
//! turn-control set, what the interfaces' addresses say, and the map image
//! written to the kernel whenever any of them changes.
//!
//! turn-control's SetConfig may only narrow what the agent's own flags allow
//! ([`Bounds`]): a compromised turn-control must not point the kernel at
//! another UDP service's ports or at addresses that are not the relay's.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use bpf_common::{DEFAULT_EVENT_INTERVAL_LOG2, KernelConfig, MAX_LISTEN_PORTS};
use ipnet::IpNet;

use crate::addresses::{Learned, RelayAddresses};
use crate::binding::{Limits, is_relay_candidate};
use crate::peers::PeerPolicy;

/// Why a configuration was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A port of zero or above 65535.
    #[error("{field} {value} is not a port (1-65535)")]
    BadPort {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: u32,
    },
    /// The allocation range is empty.
    #[error("port range {low}-{high} is empty")]
    EmptyRange {
        /// Low end.
        low: u16,
        /// High end.
        high: u16,
    },
    /// A listener's port lies inside the allocation range.
    #[error("listen port {listen} lies inside the allocation range {low}-{high}")]
    ListenInRange {
        /// The listen port.
        listen: u16,
        /// Low end.
        low: u16,
        /// High end.
        high: u16,
    },
    /// No listener: no client channel data could be relayed.
    #[error("no listener: give at least one (turn-control's listen addresses)")]
    NoListener,
    /// More distinct listener ports than the kernel tells apart.
    #[error("{count} distinct listener ports; the data plane takes at most {MAX_LISTEN_PORTS}")]
    TooManyListenPorts {
        /// How many were given.
        count: usize,
    },
    /// A relay address that is not a usable unicast address of its family.
    #[error("{field} {value:?} is not a usable unicast address of its family")]
    BadAddress {
        /// The field's name.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// The allocation range reaches outside the agent's own `--ports`.
    #[error(
        "port_min-port_max {low}-{high} reaches outside the agent's --ports {bound_low}-{bound_high}"
    )]
    PortsOutsideBounds {
        /// Low end.
        low: u16,
        /// High end.
        high: u16,
        /// Low end of `--ports`.
        bound_low: u16,
        /// High end of `--ports`.
        bound_high: u16,
    },
    /// A listener that the agent's own `--listen` does not allow.
    #[error("listeners: {listener} is not allowed by the agent's --listen {allowed}")]
    ListenerOutsideBounds {
        /// The listener.
        listener: SocketAddr,
        /// The listeners of `--listen`, as text.
        allowed: String,
    },
    /// A relay address that is not an address of the attached interfaces.
    #[error("{field} {ip} is not an address of the attached interfaces nor the agent's --relay-ip")]
    RelayNotAttached {
        /// The field's name.
        field: &'static str,
        /// The address.
        ip: IpAddr,
    },
}

impl SettingsError {
    /// Whether the request reaches beyond what the agent's own flags and
    /// interfaces allow (PERMISSION_DENIED), rather than being malformed
    /// (INVALID_ARGUMENT).
    pub fn is_beyond_bounds(&self) -> bool {
        matches!(
            self,
            SettingsError::PortsOutsideBounds { .. }
                | SettingsError::ListenerOutsideBounds { .. }
                | SettingsError::RelayNotAttached { .. }
        )
    }
}

/// What the agent's own flags allow turn-control to set: a SetConfig may
/// narrow them, never widen them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `--ports`: the allocation range must lie within it (the kernel takes
    /// every datagram to these ports of the relay address).
    pub ports: (u16, u16),
    /// `--listen`: a listener must be one of them, or on the port of a
    /// wildcard one of its family.
    pub listeners: Vec<SocketAddr>,
    /// `--relay-ip`: relay addresses turn-control may name besides those of
    /// the attached interfaces.
    pub relay: RelayAddresses,
}

impl Bounds {
    /// Whether `listener` is one `--listen` allows.
    pub fn allows_listener(&self, listener: SocketAddr) -> bool {
        self.listeners.iter().any(|bound| {
            bound.port() == listener.port()
                && bound.is_ipv4() == listener.is_ipv4()
                && (bound.ip().is_unspecified() || bound.ip() == listener.ip())
        })
    }

    /// Whether `ip` is the `--relay-ip` of its family.
    fn is_relay(&self, ip: IpAddr) -> bool {
        let RelayAddresses {
            relay_ipv4,
            relay_ipv6,
        } = self.relay;
        relay_ipv4.map(IpAddr::V4) == Some(ip) || relay_ipv6.map(IpAddr::V6) == Some(ip)
    }
}

/// How relayed frames find their next hop.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum NextHop {
    /// The kernel's FIB: the route and neighbour of each relayed datagram's
    /// destination, on the ingress interface (`XDP_TX`) or another attached
    /// one (`XDP_REDIRECT`).
    #[default]
    Fib,
    /// Back to the MAC address the frame came from, out of the interface it
    /// came in on: right only when every client and peer is reached through
    /// the one gateway that sends the relay its traffic.
    MacSwap,
}

impl NextHop {
    /// The name the flag, the configuration and gRPC use.
    pub fn name(self) -> &'static str {
        match self {
            NextHop::Fib => "fib",
            NextHop::MacSwap => "mac-swap",
        }
    }
}

/// The agent's data-plane settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// turn-control's UDP listeners, as it binds them (wildcards included).
    pub listeners: Vec<SocketAddr>,
    /// The allocation port range.
    pub ports: (u16, u16),
    /// Relay addresses given by flag or by turn-control: they win over learned ones.
    pub configured: RelayAddresses,
    /// What the host's addresses say: the relay addresses learned from the
    /// attached interfaces, their every address, and the host's.
    pub learned: Learned,
    /// What the flags allow turn-control to set.
    pub bounds: Bounds,
    /// `--allow-peer`: peer networks the kernel may relay to inside the
    /// built-in denied ranges.
    pub allow_peers: Vec<IpNet>,
    /// Header room from the tail.
    pub tail_adjust: bool,
    /// How relayed frames find their next hop.
    pub next_hop: NextHop,
    /// log2 of the packets between perf-event reports.
    pub event_interval_log2: u8,
}

impl Settings {
    /// Settings from the agent's flags.
    pub fn new(
        listeners: Vec<SocketAddr>,
        ports: (u16, u16),
        configured: RelayAddresses,
        tail_adjust: bool,
        next_hop: NextHop,
    ) -> Result<Self, SettingsError> {
        let bounds = Bounds {
            ports,
            listeners: listeners.iter().map(|a| canonical(*a)).collect(),
            relay: configured,
        };
        let settings = Self {
            listeners,
            ports,
            configured,
            learned: Learned::default(),
            bounds,
            allow_peers: Vec::new(),
            tail_adjust,
            next_hop,
            event_interval_log2: DEFAULT_EVENT_INTERVAL_LOG2,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// The relay addresses in force: per family, the configured one, else
    /// the learned one.
    pub fn relay(&self) -> RelayAddresses {
        RelayAddresses {
            relay_ipv4: self.configured.relay_ipv4.or(self.learned.relay.relay_ipv4),
            relay_ipv6: self.configured.relay_ipv6.or(self.learned.relay.relay_ipv6),
        }
    }

    /// What bindings are validated against: the configuration in force and
    /// the peer policy, which knows the host's addresses (every interface's,
    /// the relay's and the listeners'), the allocation ports in force (on
    /// which an allowed one of them is open) and the listener ports.
    pub fn limits(&self) -> Limits {
        let RelayAddresses {
            relay_ipv4,
            relay_ipv6,
        } = self.relay();
        let own = self
            .learned
            .host
            .iter()
            .copied()
            .chain(relay_ipv4.map(IpAddr::V4))
            .chain(relay_ipv6.map(IpAddr::V6))
            .chain(self.listeners.iter().map(SocketAddr::ip))
            .filter(|ip| !ip.is_unspecified());
        Limits {
            listeners: self.listeners.clone(),
            ports: self.ports,
            relay_ipv4,
            relay_ipv6,
            policy: PeerPolicy::new(self.allow_peers.clone(), own)
                .with_ports(self.ports.0..=self.ports.1, self.listen_ports()),
        }
    }

    /// The listeners' distinct ports, in order.
    pub fn listen_ports(&self) -> Vec<u16> {
        let ports: BTreeSet<u16> = self.listeners.iter().map(SocketAddr::port).collect();
        ports.into_iter().collect()
    }

    /// The image written to the `CONFIG` map.
    pub fn to_map(&self) -> KernelConfig {
        let relay = self.relay();
        let mut config = KernelConfig::new(
            &self.listen_ports(),
            self.ports,
            relay.relay_ipv4,
            relay.relay_ipv6,
        )
        .with_tail_adjust(self.tail_adjust)
        .with_mac_swap(self.next_hop == NextHop::MacSwap);
        config.event_interval_log2 = self.event_interval_log2;
        config
    }

    /// The configuration as gRPC reports it.
    pub fn to_proto(&self) -> proto::v1::DataPlaneConfig {
        let relay = self.relay();
        proto::v1::DataPlaneConfig {
            listeners: self.listeners.iter().map(ToString::to_string).collect(),
            next_hop: self.next_hop.name().to_owned(),
            port_min: u32::from(self.ports.0),
            port_max: u32::from(self.ports.1),
            relay_ipv4: relay
                .relay_ipv4
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            relay_ipv6: relay
                .relay_ipv6
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            tail_adjust: self.tail_adjust,
        }
    }

    /// These settings with a SetConfig request applied; unset fields keep
    /// their value, an empty address string removes the configured address.
    /// The result must lie within the [`Bounds`], and a relay address the
    /// request names must be one of the attached interfaces' (or `--relay-ip`).
    pub fn with_request(
        &self,
        request: &proto::v1::SetConfigRequest,
    ) -> Result<Self, SettingsError> {
        let mut next = self.clone();
        if let Some(listeners) = &request.listeners {
            next.listeners = listeners
                .addresses
                .iter()
                .map(|text| {
                    text.parse::<SocketAddr>().map(canonical).map_err(|_| {
                        SettingsError::BadAddress {
                            field: "listeners",
                            value: text.clone(),
                        }
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(port) = request.port_min {
            next.ports.0 = port_field("port_min", port)?;
        }
        if let Some(port) = request.port_max {
            next.ports.1 = port_field("port_max", port)?;
        }
        if let Some(text) = &request.relay_ipv4 {
            next.configured.relay_ipv4 = address_field("relay_ipv4", text, |ip| match ip {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })?;
        }
        if let Some(text) = &request.relay_ipv6 {
            next.configured.relay_ipv6 = address_field("relay_ipv6", text, |ip| match ip {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            })?;
        }
        if let Some(tail_adjust) = request.tail_adjust {
            next.tail_adjust = tail_adjust;
        }
        next.validate()?;
        next.within_bounds()?;
        let named = [
            (
                "relay_ipv4",
                request.relay_ipv4.as_ref(),
                next.configured.relay_ipv4.map(IpAddr::V4),
            ),
            (
                "relay_ipv6",
                request.relay_ipv6.as_ref(),
                next.configured.relay_ipv6.map(IpAddr::V6),
            ),
        ];
        for (field, asked, ip) in named {
            if let (Some(_), Some(ip)) = (asked, ip)
                && !self.learned.attached.contains(&ip)
                && !self.bounds.is_relay(ip)
            {
                return Err(SettingsError::RelayNotAttached { field, ip });
            }
        }
        Ok(next)
    }

    /// Whether the ports and listeners lie within what the flags allow.
    fn within_bounds(&self) -> Result<(), SettingsError> {
        let (low, high) = self.ports;
        let (bound_low, bound_high) = self.bounds.ports;
        if low < bound_low || high > bound_high {
            return Err(SettingsError::PortsOutsideBounds {
                low,
                high,
                bound_low,
                bound_high,
            });
        }
        if let Some(&listener) = self
            .listeners
            .iter()
            .find(|listener| !self.bounds.allows_listener(**listener))
        {
            return Err(SettingsError::ListenerOutsideBounds {
                listener,
                allowed: self
                    .bounds
                    .listeners
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let (low, high) = self.ports;
        if low > high {
            return Err(SettingsError::EmptyRange { low, high });
        }
        if self.listeners.is_empty() {
            return Err(SettingsError::NoListener);
        }
        let listen_ports = self.listen_ports();
        if listen_ports.len() > MAX_LISTEN_PORTS {
            return Err(SettingsError::TooManyListenPorts {
                count: listen_ports.len(),
            });
        }
        if let Some(&listen) = listen_ports.iter().find(|p| (low..=high).contains(*p)) {
            return Err(SettingsError::ListenInRange { listen, low, high });
        }
        for (field, port) in [("listeners", listen_ports[0]), ("port_min", low)] {
            if port == 0 {
                return Err(SettingsError::BadPort { field, value: 0 });
            }
        }
        Ok(())
    }
}

/// `address` with an IPv4-mapped IP as the IPv4 one.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

fn port_field(field: &'static str, value: u32) -> Result<u16, SettingsError> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or(SettingsError::BadPort { field, value })
}

/// A relay address field of a request: empty is none; otherwise a usable
/// unicast address that `of_family` takes (it refuses the other family).
fn address_field<T>(
    field: &'static str,
    text: &str,
    of_family: impl FnOnce(IpAddr) -> Option<T>,
) -> Result<Option<T>, SettingsError> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || SettingsError::BadAddress {
        field,
        value: text.to_owned(),
    };
    let ip: IpAddr = text.parse().map_err(|_| bad())?;
    if !is_relay_candidate(ip) {
        return Err(bad());
    }
    of_family(ip).map(Some).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use proto::v1::SetConfigRequest;

    fn wildcards() -> Vec<SocketAddr> {
        vec![
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap(),
        ]
    }

    fn settings() -> Settings {
        Settings::new(
            wildcards(),
            (49152, 65535),
            RelayAddresses::default(),
            false,
            NextHop::Fib,
        )
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// The host holds 203.0.113.10 and 198.51.100.1 on the attached
    /// interfaces, 2001:db8::1 on another, and 192.0.2.1 and 2001:db8::2 on
    /// other interfaces.
    fn learned() -> Learned {
        Learned {
            relay: RelayAddresses {
                relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 10)),
                relay_ipv6: None,
            },
            attached: BTreeSet::from([ip("203.0.113.10"), ip("198.51.100.1"), ip("2001:db8::1")]),
            host: BTreeSet::from([
                ip("203.0.113.10"),
                ip("198.51.100.1"),
                ip("2001:db8::1"),
                ip("192.0.2.1"),
                ip("2001:db8::2"),
                ip("127.0.0.1"),
            ]),
        }
    }

    #[test]
    fn configured_addresses_win_over_learned_ones() {
        let mut s = settings();
        s.learned = learned();
        assert_eq!(
            s.relay(),
            RelayAddresses {
                relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 10)),
                relay_ipv6: None
            }
        );
        let s = s
            .with_request(&SetConfigRequest {
                relay_ipv4: Some("198.51.100.1".into()),
                relay_ipv6: Some("2001:db8::1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            s.relay(),
            RelayAddresses {
                relay_ipv4: Some(Ipv4Addr::new(198, 51, 100, 1)),
                relay_ipv6: Some("2001:db8::1".parse().unwrap())
            }
        );
        let map = s.to_map();
        assert_eq!(map.relay_ipv4, [198, 51, 100, 1]);
        assert!(map.enabled());
        // An empty string drops the configured address: the learned one is back.
        let s = s
            .with_request(&SetConfigRequest {
                relay_ipv4: Some(String::new()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(s.relay().relay_ipv4, Some(Ipv4Addr::new(203, 0, 113, 10)));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let s = settings();
        let refuse = |r: SetConfigRequest| s.with_request(&r).unwrap_err();
        let listeners = |addresses: &[&str]| {
            Some(proto::v1::Listeners {
                addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            })
        };
        assert!(matches!(
            refuse(SetConfigRequest {
                listeners: listeners(&["0.0.0.0:70000"]),
                ..Default::default()
            }),
            SettingsError::BadAddress {
                field: "listeners",
                ..
            }
        ));
        assert_eq!(
            refuse(SetConfigRequest {
                listeners: listeners(&[]),
                ..Default::default()
            }),
            SettingsError::NoListener
        );
        assert_eq!(
            refuse(SetConfigRequest {
                listeners: listeners(&[
                    "0.0.0.0:1",
                    "0.0.0.0:2",
                    "0.0.0.0:3",
                    "0.0.0.0:4",
                    "0.0.0.0:5",
                    "0.0.0.0:6",
                    "0.0.0.0:7",
                    "0.0.0.0:8",
                    "0.0.0.0:9"
                ]),
                ..Default::default()
            }),
            SettingsError::TooManyListenPorts { count: 9 }
        );
        assert_eq!(
            refuse(SetConfigRequest {
                listeners: listeners(&["0.0.0.0:3478", "203.0.113.1:50000"]),
                ..Default::default()
            }),
            SettingsError::ListenInRange {
                listen: 50000,
                low: 49152,
                high: 65535
            }
        );
        assert_eq!(
            refuse(SetConfigRequest {
                port_min: Some(60000),
                port_max: Some(50000),
                ..Default::default()
            }),
            SettingsError::EmptyRange {
                low: 60000,
                high: 50000
            }
        );
        assert!(matches!(
            refuse(SetConfigRequest {
                relay_ipv4: Some("2001:db8::1".into()),
                ..Default::default()
            }),
            SettingsError::BadAddress {
                field: "relay_ipv4",
                ..
            }
        ));
        assert!(matches!(
            refuse(SetConfigRequest {
                relay_ipv6: Some("ff02::1".into()),
                ..Default::default()
            }),
            SettingsError::BadAddress {
                field: "relay_ipv6",
                ..
            }
        ));
        assert!(matches!(
            refuse(SetConfigRequest {
                relay_ipv4: Some("127.0.0.1".into()),
                ..Default::default()
            }),
            SettingsError::BadAddress { .. }
        ));
    }

    #[test]
    fn requests_only_narrow_what_the_flags_allow() {
        let mut s = Settings::new(
            vec![
                "0.0.0.0:3478".parse().unwrap(),
                "[2001:db8::1]:3478".parse().unwrap(),
                "203.0.113.10:443".parse().unwrap(),
            ],
            (49152, 60000),
            RelayAddresses::default(),
            false,
            NextHop::Fib,
        )
        .unwrap();
        s.learned = learned();
        let listeners = |addresses: &[&str]| SetConfigRequest {
            listeners: Some(proto::v1::Listeners {
                addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            }),
            ..Default::default()
        };
        // Narrower: fine, and then narrower again, or back to the flags.
        let narrowed = s
            .with_request(&SetConfigRequest {
                port_min: Some(50000),
                port_max: Some(50100),
                ..listeners(&["203.0.113.10:3478", "[::ffff:198.51.100.1]:3478"])
            })
            .unwrap();
        assert_eq!(narrowed.ports, (50000, 50100));
        assert_eq!(narrowed.listeners[1], "198.51.100.1:3478".parse().unwrap());
        assert!(
            narrowed
                .with_request(&SetConfigRequest {
                    port_min: Some(49152),
                    port_max: Some(60000),
                    ..listeners(&["0.0.0.0:3478", "[2001:db8::1]:3478", "203.0.113.10:443"])
                })
                .is_ok()
        );
        let refuse = |r: SetConfigRequest| {
            let error = narrowed.with_request(&r).unwrap_err();
            assert!(error.is_beyond_bounds(), "{error}");
            error
        };
        assert_eq!(
            refuse(SetConfigRequest {
                port_max: Some(60001),
                ..Default::default()
            }),
            SettingsError::PortsOutsideBounds {
                low: 50000,
                high: 60001,
                bound_low: 49152,
                bound_high: 60000
            }
        );
        assert!(
            refuse(SetConfigRequest {
                port_min: Some(40000),
                ..Default::default()
            })
            .to_string()
            .starts_with("port_min-port_max 40000-50100 reaches outside the agent's --ports")
        );
        // A port no flag names; a wildcard only where the flag is one; a
        // specific address of another family; another address on 443.
        for listener in [
            "203.0.113.10:53",
            "[::]:3478",
            "[2001:db8::2]:3478",
            "198.51.100.1:443",
        ] {
            let error = refuse(listeners(&["0.0.0.0:3478", listener]));
            assert_eq!(
                error.to_string(),
                format!(
                    "listeners: {listener} is not allowed by the agent's --listen \
                     0.0.0.0:3478,[2001:db8::1]:3478,203.0.113.10:443"
                )
            );
        }
        // Relay addresses: those of the attached interfaces only.
        for (field, value) in [("relay_ipv4", "192.0.2.1"), ("relay_ipv6", "2001:db8::2")] {
            let mut request = SetConfigRequest::default();
            match field {
                "relay_ipv4" => request.relay_ipv4 = Some(value.into()),
                _ => request.relay_ipv6 = Some(value.into()),
            }
            assert_eq!(
                refuse(request),
                SettingsError::RelayNotAttached {
                    field,
                    ip: ip(value)
                }
            );
        }
        // Malformed requests stay INVALID_ARGUMENT.
        let empty = narrowed
            .with_request(&SetConfigRequest {
                port_min: Some(50200),
                ..Default::default()
            })
            .unwrap_err();
        assert!(!empty.is_beyond_bounds());
    }

    #[test]
    fn a_relay_address_named_by_flag_may_be_set_again() {
        let flagged = RelayAddresses {
            relay_ipv4: Some(Ipv4Addr::new(192, 0, 2, 77)),
            relay_ipv6: None,
        };
        let mut s =
            Settings::new(wildcards(), (49152, 65535), flagged, false, NextHop::Fib).unwrap();
        s.learned = learned();
        let cleared = s
            .with_request(&SetConfigRequest {
                relay_ipv4: Some(String::new()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            cleared.relay().relay_ipv4,
            Some(Ipv4Addr::new(203, 0, 113, 10))
        );
        let again = cleared
            .with_request(&SetConfigRequest {
                relay_ipv4: Some("192.0.2.77".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(again.relay(), flagged);
    }

    #[test]
    fn bindings_are_checked_against_the_host_s_addresses_and_the_allowed_peers() {
        let mut s = settings();
        s.learned = learned();
        s.allow_peers = vec!["198.51.100.0/24".parse().unwrap()];
        assert!(
            s.limits()
                .policy
                .peer("198.51.100.2:9".parse().unwrap())
                .is_ok()
        );
        s.allow_peers.push("192.0.2.0/24".parse().unwrap());
        s.ports = (50000, 50100);
        let policy = s.limits().policy;
        let at = |text: &str, port| SocketAddr::new(ip(text), port);
        assert_eq!(policy.peer(at("198.51.100.2", 9)), Ok(()));
        for host in ["198.51.100.1", "192.0.2.1"] {
            assert_eq!(
                policy.peer(at(host, 9)),
                Err(crate::peers::Denied::HostPort),
                "{host}"
            );
            // Open on the allocation ports in force alone.
            assert_eq!(policy.peer(at(host, 50100)), Ok(()), "{host}");
            assert_eq!(
                policy.peer(at(host, 50101)),
                Err(crate::peers::Denied::HostPort),
                "{host}"
            );
            assert_eq!(
                policy.peer(at(host, 3478)),
                Err(crate::peers::Denied::ListenerPort),
                "{host}"
            );
        }
        for (host, denied) in [
            ("2001:db8::2", crate::peers::Denied::Reserved),
            ("203.0.113.10", crate::peers::Denied::Reserved),
        ] {
            assert_eq!(policy.peer(at(host, 50000)), Err(denied), "{host}");
        }
        assert_eq!(
            policy.peer(at("10.0.0.1", 9)),
            Err(crate::peers::Denied::Private)
        );
    }

    #[test]
    fn the_kernel_gets_each_listener_port_once_and_the_next_hop_mode() {
        let mut s = settings();
        s.listeners = vec![
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap(),
            "203.0.113.10:443".parse().unwrap(),
        ];
        assert_eq!(s.listen_ports(), [443, 3478]);
        let map = s.to_map();
        assert_eq!(map.listen_ports[..3], [[0x01, 0xbb], [0x0d, 0x96], [0, 0]]);
        assert!(!map.mac_swap());
        s.next_hop = NextHop::MacSwap;
        assert!(s.to_map().mac_swap());
        assert_eq!(s.to_proto().next_hop, "mac-swap");
        assert_eq!(s.to_proto().listeners.len(), 3);
    }

    #[test]
    fn flags_are_validated_like_requests() {
        assert_eq!(
            Settings::new(
                vec!["0.0.0.0:50000".parse().unwrap()],
                (49152, 65535),
                RelayAddresses::default(),
                false,
                NextHop::Fib
            )
            .unwrap_err(),
            SettingsError::ListenInRange {
                listen: 50000,
                low: 49152,
                high: 65535
            }
        );
    }
}
