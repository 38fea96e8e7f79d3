//! The data-plane configuration as the agent keeps it: what flags and
//! turn-control set, what the interfaces' addresses say, and the map image
//! written to the kernel whenever any of them changes.

use std::net::IpAddr;

use bpf_common::{DEFAULT_EVENT_INTERVAL_LOG2, KernelConfig};

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
    pub configured: RelayAddresses,
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
        configured: RelayAddresses,
        tail_adjust: bool,
    ) -> Result<Self, SettingsError> {
        let settings = Self {
            listen_port,
            ports,
            configured,
            learned: RelayAddresses::default(),
            tail_adjust,
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
            listen_port: self.listen_port,
            ports: self.ports,
            relay_ipv4,
            relay_ipv6,
        }
    }

    /// The image written to the `CONFIG` map.
    pub fn to_map(self) -> KernelConfig {
        let relay = self.relay();
        let mut config = KernelConfig::new(
            self.listen_port,
            self.ports,
            relay.relay_ipv4,
            relay.relay_ipv6,
        )
        .with_tail_adjust(self.tail_adjust);
        config.event_interval_log2 = self.event_interval_log2;
        config
    }

    /// The configuration as gRPC reports it.
    pub fn to_proto(self) -> proto::v1::DataPlaneConfig {
        let relay = self.relay();
        proto::v1::DataPlaneConfig {
            listen_port: u32::from(self.listen_port),
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

    fn settings() -> Settings {
        Settings::new(3478, (49152, 65535), RelayAddresses::default(), false).unwrap()
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
            Settings::new(50000, (49152, 65535), RelayAddresses::default(), false).unwrap_err(),
            SettingsError::ListenInRange {
                listen: 50000,
                low: 49152,
                high: 65535
            }
        );
    }
}
