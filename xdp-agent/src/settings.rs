//! The data-plane configuration as the agent keeps it: what flags and
//! turn-control set, what the interfaces' addresses say, and the map image
//! written to the kernel whenever any of them changes.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use bpf_common::{DEFAULT_EVENT_INTERVAL_LOG2, KernelConfig, MAX_LISTEN_PORTS};

use crate::addresses::RelayAddresses;
use crate::binding::{Limits, is_relay_candidate};

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
    /// The addresses learned from the attached interfaces.
    pub learned: RelayAddresses,
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
        let settings = Self {
            listeners,
            ports,
            configured,
            learned: RelayAddresses::default(),
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
            relay_ipv4: self.configured.relay_ipv4.or(self.learned.relay_ipv4),
            relay_ipv6: self.configured.relay_ipv6.or(self.learned.relay_ipv6),
        }
    }

    /// What bindings are validated against.
    pub fn limits(&self) -> Limits {
        let RelayAddresses {
            relay_ipv4,
            relay_ipv6,
        } = self.relay();
        Limits {
            listeners: self.listeners.clone(),
            ports: self.ports,
            relay_ipv4,
            relay_ipv6,
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
                    text.parse::<SocketAddr>()
                        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                        .map_err(|_| SettingsError::BadAddress {
                            field: "listeners",
                            value: text.clone(),
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
        Ok(next)
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

    #[test]
    fn configured_addresses_win_over_learned_ones() {
        let mut s = settings();
        s.learned = RelayAddresses {
            relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 10)),
            relay_ipv6: None,
        };
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
