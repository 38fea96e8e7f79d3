//! Option types of the network: port ranges and one address per family.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A non-empty range of non-zero ports, `LOW-HIGH` inclusive, in flags and files alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    low: u16,
    high: u16,
}

impl PortRange {
    /// `low..=high`, if both are ports and `low` is at most `high`.
    pub fn new(low: u16, high: u16) -> Result<Self, PortRangeError> {
        if low == 0 {
            return Err(PortRangeError::NotAPort("0".to_owned()));
        }
        if low > high {
            return Err(PortRangeError::Empty { low, high });
        }
        Ok(Self { low, high })
    }

    /// The lowest port.
    pub fn low(&self) -> u16 {
        self.low
    }

    /// The highest port.
    pub fn high(&self) -> u16 {
        self.high
    }

    /// The ports.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.low..=self.high
    }

    /// How many ports the range holds (at least one).
    pub fn len(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why a text is not a `LOW-HIGH` port range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// There is no `-`.
    #[error("\"{0}\" is not LOW-HIGH, e.g. 49152-65535")]
    NotARange(String),
    /// A bound is not a number from 1 to 65535.
    #[error("{0} is not a port")]
    NotAPort(String),
    /// LOW is above HIGH.
    #[error("{low}-{high} is empty (LOW above HIGH)")]
    Empty {
        /// The lower bound as given.
        low: u16,
        /// The upper bound as given.
        high: u16,
    },
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (low, high) = text
            .split_once('-')
            .ok_or_else(|| PortRangeError::NotARange(text.to_owned()))?;
        let port = |bound: &str| -> Result<u16, PortRangeError> {
            let bound = bound.trim();
            match bound.parse::<u64>() {
                Ok(number) => u16::try_from(number)
                    .ok()
                    .filter(|&port| port != 0)
                    .ok_or_else(|| PortRangeError::NotAPort(number.to_string())),
                Err(_) => Err(PortRangeError::NotAPort(format!("\"{bound}\""))),
            }
        };
        Self::new(port(low)?, port(high)?)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(de::Error::custom)
    }
}

/// Two different addresses of one family where one is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("at most one address per family")]
pub struct TwoInOneFamily {
    /// The address given first.
    pub first: IpAddr,
    /// The other address of its family.
    pub second: IpAddr,
}

/// The IPv4 and the IPv6 address among `ips`, each at most once (repeating the same address
/// is allowed).
pub fn one_per_family(
    ips: &[IpAddr],
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), TwoInOneFamily> {
    let (mut v4, mut v6) = (None::<Ipv4Addr>, None::<Ipv6Addr>);
    for &ip in ips {
        let first = match ip {
            IpAddr::V4(ip) => v4.replace(ip).filter(|&old| old != ip).map(IpAddr::V4),
            IpAddr::V6(ip) => v6.replace(ip).filter(|&old| old != ip).map(IpAddr::V6),
        };
        if let Some(first) = first {
            return Err(TwoInOneFamily { first, second: ip });
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_or_explain() {
        let range: PortRange = "49152-65535".parse().unwrap();
        assert_eq!(range.range(), 49152..=65535);
        assert_eq!(range.len(), 16384);
        assert_eq!(range.to_string(), "49152-65535");
        assert_eq!(" 1 - 2 ".parse::<PortRange>().unwrap().range(), 1..=2);
        let error = |text: &str| text.parse::<PortRange>().unwrap_err().to_string();
        assert_eq!(error("0-10"), "0 is not a port");
        assert_eq!(error("1-70000"), "70000 is not a port");
        assert_eq!(error("a-10"), "\"a\" is not a port");
        assert_eq!(
            error("65535-49152"),
            "65535-49152 is empty (LOW above HIGH)"
        );
        assert!(error("49152").contains("LOW-HIGH"));
    }

    #[test]
    fn one_address_per_family() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(
            one_per_family(&[ip("192.0.2.1"), ip("2001:db8::1"), ip("192.0.2.1")]),
            Ok((
                Some(Ipv4Addr::new(192, 0, 2, 1)),
                Some("2001:db8::1".parse().unwrap())
            ))
        );
        assert_eq!(one_per_family(&[]), Ok((None, None)));
        let error = one_per_family(&[ip("192.0.2.1"), ip("192.0.2.2")]).unwrap_err();
        assert_eq!(error.second, ip("192.0.2.2"));
        assert_eq!(error.to_string(), "at most one address per family");
    }
}
