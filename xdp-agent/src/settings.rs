//! The data-plane configuration as the agent keeps it: what flags and
//! turn-control set, what the interfaces' addresses say, and the map image
//! written to the kernel whenever any of them changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bpf_common::{DEFAULT_EVENT_INTERVAL_LOG2, DataPlaneConfig};

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
    /// The listen port lies inside the allocation range.
    #[error("listen port {listen} lies inside the allocation range {low}-{high}")]
    ListenInRange {
        /// The listen port.
        listen: u16,
        /// Low end.
        low: u16,
        /// High end.
        high: u16,
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

/// The agent's data-plane settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The TURN listen port.
    pub listen_port: u16,
    /// The allocation port range.
    pub ports: (u16, u16),
    /// Relay addresses given by flag or by turn-control: they win over learned ones.
    pub override_v4: Option<Ipv4Addr>,
    /// As `override_v4` for IPv6.
    pub override_v6: Option<Ipv6Addr>,
    /// The addresses learned from the attached interfaces.
    pub learned: RelayAddresses,
    /// Header room from the tail.
    pub tail_adjust: bool,
    /// log2 of the packets between perf-event reports.
    pub event_interval_log2: u8,
}

impl Settings {
    /// Settings from the agent's flags.
    pub fn new(
        listen_port: u16,
        ports: (u16, u16),
        overrides: (Option<Ipv4Addr>, Option<Ipv6Addr>),
        tail_adjust: bool,
    ) -> Result<Self, SettingsError> {
        let settings = Self {
            listen_port,
            ports,
            override_v4: overrides.0,
            override_v6: overrides.1,
            learned: RelayAddresses::default(),
            tail_adjust,
            event_interval_log2: DEFAULT_EVENT_INTERVAL_LOG2,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// The relay addresses in force.
    pub fn relay(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        (
            self.override_v4.or(self.learned.v4),
            self.override_v6.or(self.learned.v6),
        )
    }

    /// What bindings are validated against.
    pub fn limits(&self) -> Limits {
        let (relay_v4, relay_v6) = self.relay();
        Limits {
            listen_port: self.listen_port,
            ports: self.ports,
            relay_v4,
            relay_v6,
        }
    }

    /// The image written to the `CONFIG` map.
    pub fn to_map(self) -> DataPlaneConfig {
        let (relay_v4, relay_v6) = self.relay();
        let mut config = DataPlaneConfig::new(self.listen_port, self.ports, relay_v4, relay_v6)
            .with_tail_adjust(self.tail_adjust);
        config.event_interval_log2 = self.event_interval_log2;
        config
    }

    /// The configuration as gRPC reports it.
    pub fn to_proto(self) -> proto::v1::DataPlaneConfig {
        let (relay_v4, relay_v6) = self.relay();
        proto::v1::DataPlaneConfig {
            listen_port: u32::from(self.listen_port),
            port_min: u32::from(self.ports.0),
            port_max: u32::from(self.ports.1),
            relay_ipv4: relay_v4.map(|ip| ip.to_string()).unwrap_or_default(),
            relay_ipv6: relay_v6.map(|ip| ip.to_string()).unwrap_or_default(),
            tail_adjust: self.tail_adjust,
        }
    }

    /// These settings with a SetConfig request applied; unset fields keep
    /// their value, an empty address string removes the override.
    pub fn with_request(
        &self,
        request: &proto::v1::SetConfigRequest,
    ) -> Result<Self, SettingsError> {
        let mut next = *self;
        if let Some(port) = request.listen_port {
            next.listen_port = port_field("listen_port", port)?;
        }
        if let Some(port) = request.port_min {
            next.ports.0 = port_field("port_min", port)?;
        }
        if let Some(port) = request.port_max {
            next.ports.1 = port_field("port_max", port)?;
        }
        if let Some(text) = &request.relay_ipv4 {
            next.override_v4 = match address_field("relay_ipv4", text)? {
                None => None,
                Some(IpAddr::V4(ip)) => Some(ip),
                Some(IpAddr::V6(_)) => {
                    return Err(SettingsError::BadAddress {
                        field: "relay_ipv4",
                        value: text.clone(),
                    });
                }
            };
        }
        if let Some(text) = &request.relay_ipv6 {
            next.override_v6 = match address_field("relay_ipv6", text)? {
                None => None,
                Some(IpAddr::V6(ip)) => Some(ip),
                Some(IpAddr::V4(_)) => {
                    return Err(SettingsError::BadAddress {
                        field: "relay_ipv6",
                        value: text.clone(),
                    });
                }
            };
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
        if (low..=high).contains(&self.listen_port) {
            return Err(SettingsError::ListenInRange {
                listen: self.listen_port,
                low,
                high,
            });
        }
        for (field, port) in [("listen_port", self.listen_port), ("port_min", low)] {
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

fn address_field(field: &'static str, text: &str) -> Result<Option<IpAddr>, SettingsError> {
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
    Ok(Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::SetConfigRequest;

    fn settings() -> Settings {
        Settings::new(3478, (49152, 65535), (None, None), false).unwrap()
    }

    #[test]
    fn overrides_win_over_learned_addresses() {
        let mut s = settings();
        s.learned = RelayAddresses {
            v4: Some(Ipv4Addr::new(203, 0, 113, 10)),
            v6: None,
        };
        assert_eq!(s.relay(), (Some(Ipv4Addr::new(203, 0, 113, 10)), None));
        let s = s
            .with_request(&SetConfigRequest {
                relay_ipv4: Some("198.51.100.1".into()),
                relay_ipv6: Some("2001:db8::1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            s.relay(),
            (
                Some(Ipv4Addr::new(198, 51, 100, 1)),
                Some("2001:db8::1".parse().unwrap())
            )
        );
        let map = s.to_map();
        assert_eq!(map.relay_v4, [198, 51, 100, 1]);
        assert!(map.enabled());
        // An empty string drops the override: the learned address is back.
        let s = s
            .with_request(&SetConfigRequest {
                relay_ipv4: Some(String::new()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(s.relay().0, Some(Ipv4Addr::new(203, 0, 113, 10)));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let s = settings();
        let refuse = |r: SetConfigRequest| s.with_request(&r).unwrap_err();
        assert_eq!(
            refuse(SetConfigRequest {
                listen_port: Some(70000),
                ..Default::default()
            }),
            SettingsError::BadPort {
                field: "listen_port",
                value: 70000
            }
        );
        assert_eq!(
            refuse(SetConfigRequest {
                listen_port: Some(50000),
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
    fn flags_are_validated_like_requests() {
        assert_eq!(
            Settings::new(50000, (49152, 65535), (None, None), false).unwrap_err(),
            SettingsError::ListenInRange {
                listen: 50000,
                low: 49152,
                high: 65535
            }
        );
    }
}
