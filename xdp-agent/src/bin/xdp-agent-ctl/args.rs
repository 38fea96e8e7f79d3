//! Parsers for the command line's values, and the address filters of
//! `bindings`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The channel numbers the data plane relays: RFC 5766's 0x4000-0x7FFF,
/// which includes RFC 8656's 0x4000-0x4FFF (section 12).
pub const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

/// Parses a channel number, decimal (`16385`) or hexadecimal (`0x4001`),
/// within [`CHANNELS`].
pub fn parse_channel(value: &str) -> Result<u16, String> {
    let value = value.trim();
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse::<u32>(),
    };
    let range = || {
        format!(
            "channel numbers are 0x{:04x}-0x{:04x} ({}-{})",
            CHANNELS.start(),
            CHANNELS.end(),
            CHANNELS.start(),
            CHANNELS.end()
        )
    };
    let Ok(number) = parsed else {
        return Err(format!("not a number; {}", range()));
    };
    match u16::try_from(number) {
        Ok(channel) if CHANNELS.contains(&channel) => Ok(channel),
        _ => Err(format!("out of range; {}", range())),
    }
}

/// Parses a client's transport address, `IP:PORT` (IPv6 as `[IP]:PORT`).
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .trim()
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 192.0.2.2:40000 or [2001:db8::2]:40000".to_owned())
}

/// A filter on one address of a binding: an IP alone matches every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressFilter {
    /// Any port of this IP.
    Ip(IpAddr),
    /// Exactly this transport address.
    Socket(SocketAddr),
}

impl AddressFilter {
    /// Whether the address `value` (as the agent writes it) passes. An
    /// address that does not parse never matches.
    pub fn matches(&self, value: &str) -> bool {
        let Ok(address) = value.parse::<SocketAddr>() else {
            return false;
        };
        match *self {
            Self::Ip(ip) => address.ip() == ip,
            Self::Socket(socket) => address == socket,
        }
    }
}

impl FromStr for AddressFilter {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if let Ok(ip) = value.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        // "[2001:db8::1]" without a port is an IP too.
        if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']'))
            && let Ok(ip) = inner.parse::<IpAddr>()
        {
            return Ok(Self::Ip(ip));
        }
        value.parse::<SocketAddr>().map(Self::Socket).map_err(|_| {
            "expected IP or IP:PORT, e.g. 192.0.2.2, 192.0.2.2:40000 or [2001:db8::2]:40000"
                .to_owned()
        })
    }
}

/// Canonical text, as the agent's filter fields take it ("ip" or "ip:port").
impl fmt::Display for AddressFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => ip.fmt(f),
            Self::Socket(socket) => socket.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_in_decimal_and_hex() {
        assert_eq!(parse_channel("0x4001"), Ok(0x4001));
        assert_eq!(parse_channel("0X4fff"), Ok(0x4FFF));
        assert_eq!(parse_channel("16384"), Ok(0x4000));
        assert_eq!(parse_channel(" 20479 "), Ok(0x4FFF));
        assert_eq!(parse_channel("0x5000"), Ok(0x5000));
        assert_eq!(parse_channel("32767"), Ok(0x7FFF));
    }

    #[test]
    fn channels_out_of_range_or_malformed() {
        for bad in [
            "0x3fff",
            "0x8000",
            "16383",
            "32768",
            "0",
            "65536",
            "99999999999",
            "",
            "0x",
            "x4001",
            "-1",
            "4001h",
            "0x-1",
        ] {
            let error = parse_channel(bad).expect_err(bad);
            assert!(
                error.contains("0x4000-0x7fff (16384-32767)"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_socket_addr("192.0.2.2:40000"),
            Ok("192.0.2.2:40000".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[2001:db8::2]:1"),
            Ok("[2001:db8::2]:1".parse().unwrap())
        );
        assert!(parse_socket_addr("192.0.2.2").is_err());
        assert!(parse_socket_addr("2001:db8::2:40000").is_err());
    }

    #[test]
    fn filters_parse_ip_or_transport_address() {
        let parse = |s: &str| s.parse::<AddressFilter>();
        assert_eq!(
            parse("192.0.2.2"),
            Ok(AddressFilter::Ip("192.0.2.2".parse().unwrap()))
        );
        assert_eq!(
            parse("2001:db8::2"),
            Ok(AddressFilter::Ip("2001:db8::2".parse().unwrap()))
        );
        assert_eq!(
            parse("[2001:db8::2]"),
            Ok(AddressFilter::Ip("2001:db8::2".parse().unwrap()))
        );
        assert_eq!(
            parse("[2001:db8::2]:3478"),
            Ok(AddressFilter::Socket("[2001:db8::2]:3478".parse().unwrap()))
        );
        assert_eq!(
            parse("192.0.2.2:3478").map(|f| f.to_string()),
            Ok("192.0.2.2:3478".to_owned())
        );
        assert_eq!(
            parse("2001:0db8:0::2").map(|f| f.to_string()),
            Ok("2001:db8::2".to_owned())
        );
        for bad in [
            "",
            "host.example",
            "192.0.2.2:",
            "192.0.2.256",
            "[2001:db8::2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_match_ip_or_exact_address() {
        let ip: AddressFilter = "192.0.2.2".parse().unwrap();
        assert!(ip.matches("192.0.2.2:40000"));
        assert!(ip.matches("192.0.2.2:1"));
        assert!(!ip.matches("192.0.2.3:40000"));
        assert!(!ip.matches("garbage"));
        let socket: AddressFilter = "[2001:db8::2]:40000".parse().unwrap();
        assert!(socket.matches("[2001:db8::2]:40000"));
        assert!(!socket.matches("[2001:db8::2]:40001"));
        assert!(!socket.matches("192.0.2.2:40000"));
    }
}
