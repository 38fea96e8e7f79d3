//! What the CLI prints: aligned tables and key-value lines for people, JSON
//! for programs. Pure functions from the agent's answers to text.

use std::fmt::Write as _;
use std::net::SocketAddr;

use proto::v1::{ChannelBinding, CountersResponse, DataPlaneConfig, HealthResponse};
use serde::Serialize;

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Lays out `rows` under `header`: columns two spaces apart, each as wide
/// as its widest cell, no trailing spaces; one line per row, each ending in
/// a newline.
fn table(header: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header
        .iter()
        .map(|(title, _)| title.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let titles: Vec<String> = header
        .iter()
        .map(|(title, _)| (*title).to_owned())
        .collect();
    let mut out = String::new();
    for row in std::iter::once(&titles).chain(rows) {
        let mut line = String::new();
        for (index, ((cell, width), (_, align))) in row.iter().zip(&widths).zip(header).enumerate()
        {
            if index > 0 {
                line.push_str("  ");
            }
            let _ = match align {
                Align::Left => write!(line, "{cell:<width$}"),
                Align::Right => write!(line, "{cell:>width$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Key-value lines with the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// A channel number as TURN documents write it.
pub fn channel_hex(channel: u32) -> String {
    format!("0x{channel:04x}")
}

/// Bindings in a stable order: by client address, then listener, then
/// channel. Addresses that do not parse sort after the others, by their text.
pub fn sort_bindings(bindings: &mut [ChannelBinding]) {
    // Parsed addresses first (in address order), then the others by text.
    let address = |text: &str| {
        let parsed = text.parse::<SocketAddr>().ok();
        (parsed.is_none(), parsed, text.to_owned())
    };
    bindings.sort_by_cached_key(|binding| {
        (
            address(&binding.client),
            address(&binding.listener),
            binding.channel,
        )
    });
}

/// What is left of a binding's lifetime, in whole seconds rounded up
/// ("287s"), or "expired" once it has passed (the kernel no longer relays
/// it; the agent deletes it within a second).
pub fn lifetime(lifetime_ms: u32) -> String {
    match lifetime_ms {
        0 => "expired".to_owned(),
        ms => format!("{}s", ms.div_ceil(1000)),
    }
}

/// Whether datagrams to the peer leave with DF set (the allocation asked for
/// DONT-FRAGMENT), as the `bindings` and `binding` texts show it.
pub fn dont_fragment(on: bool) -> String {
    if on { "yes" } else { "no" }.to_owned()
}

/// A binding's usage, zero when the answer has none.
fn usage_of(binding: &ChannelBinding) -> UsageJson {
    let usage = binding.usage.unwrap_or_default();
    let traffic = |traffic: Option<proto::v1::Traffic>| {
        let traffic = traffic.unwrap_or_default();
        TrafficJson {
            packets: traffic.packets,
            bytes: traffic.bytes,
        }
    };
    UsageJson {
        client_to_peer: traffic(usage.client_to_peer),
        peer_to_client: traffic(usage.peer_to_client),
        dropped_client_to_peer: traffic(usage.dropped_client_to_peer),
        dropped_peer_to_client: traffic(usage.dropped_peer_to_client),
    }
}

/// Packets and bytes as one cell: "12/3400".
fn traffic_cell(traffic: &TrafficJson) -> String {
    format!("{}/{}", traffic.packets, traffic.bytes)
}

/// A binding's rate limits as one cell: "-" for none, else each meter's
/// rate in bytes per second.
fn limits_cell(binding: &ChannelBinding) -> String {
    if binding.rate_limits.is_empty() {
        return "-".to_owned();
    }
    binding
        .rate_limits
        .iter()
        .map(|limit| format!("{}B/s", limit.bytes_per_second))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `bindings` table: CLIENT, LISTENER, CHANNEL, PEER, PORT, DF,
/// LIFETIME, the usage each way (TO-PEER, TO-CLIENT: packets/bytes of
/// application data relayed in the kernel; DROPPED: what the rate limits
/// dropped, both ways), LIMIT, then a count line.
pub fn bindings_table(bindings: &[ChannelBinding]) -> String {
    let count = match bindings.len() {
        1 => "1 binding\n".to_owned(),
        n => format!("{n} bindings\n"),
    };
    if bindings.is_empty() {
        return count;
    }
    let rows: Vec<Vec<String>> = bindings
        .iter()
        .map(|b| {
            let usage = usage_of(b);
            vec![
                b.client.clone(),
                b.listener.clone(),
                channel_hex(b.channel),
                b.peer.clone(),
                b.allocation_port.to_string(),
                dont_fragment(b.dont_fragment),
                lifetime(b.lifetime_ms),
                traffic_cell(&usage.client_to_peer),
                traffic_cell(&usage.peer_to_client),
                dropped_cell(&usage),
                limits_cell(b),
            ]
        })
        .collect();
    let header = [
        ("CLIENT", Align::Left),
        ("LISTENER", Align::Left),
        ("CHANNEL", Align::Left),
        ("PEER", Align::Left),
        ("PORT", Align::Right),
        ("DF", Align::Left),
        ("LIFETIME", Align::Right),
        ("TO-PEER", Align::Right),
        ("TO-CLIENT", Align::Right),
        ("DROPPED", Align::Right),
        ("LIMIT", Align::Right),
    ];
    table(&header, &rows) + &count
}

/// Both ways' drops as one cell.
fn dropped_cell(usage: &UsageJson) -> String {
    let packets = usage.dropped_client_to_peer.packets + usage.dropped_peer_to_client.packets;
    let bytes = usage.dropped_client_to_peer.bytes + usage.dropped_peer_to_client.bytes;
    format!("{packets}/{bytes}")
}

/// Packets and application bytes.
#[derive(Debug, Default, Serialize)]
pub struct TrafficJson {
    packets: u64,
    bytes: u64,
}

/// A binding's usage in the kernel.
#[derive(Debug, Default, Serialize)]
pub struct UsageJson {
    client_to_peer: TrafficJson,
    peer_to_client: TrafficJson,
    dropped_client_to_peer: TrafficJson,
    dropped_peer_to_client: TrafficJson,
}

/// A rate limit: the meter (its key; the kernel keeps no names) and rate.
#[derive(Debug, Serialize)]
pub struct RateLimitJson<'a> {
    meter: &'a str,
    bytes_per_second: u64,
}

/// One binding as JSON.
#[derive(Debug, Serialize)]
pub struct BindingJson<'a> {
    client: &'a str,
    listener: &'a str,
    channel: u32,
    peer: &'a str,
    allocation_port: u32,
    /// Datagrams to an IPv4 peer leave with DF set.
    dont_fragment: bool,
    /// Milliseconds left, 0 once passed.
    lifetime_ms: u32,
    /// What the kernel relayed and dropped on it.
    usage: UsageJson,
    /// Its meters.
    rate_limits: Vec<RateLimitJson<'a>>,
}

impl<'a> From<&'a ChannelBinding> for BindingJson<'a> {
    fn from(binding: &'a ChannelBinding) -> Self {
        Self {
            client: &binding.client,
            listener: &binding.listener,
            channel: binding.channel,
            peer: &binding.peer,
            allocation_port: binding.allocation_port,
            dont_fragment: binding.dont_fragment,
            lifetime_ms: binding.lifetime_ms,
            usage: usage_of(binding),
            rate_limits: binding
                .rate_limits
                .iter()
                .map(|limit| RateLimitJson {
                    meter: &limit.meter,
                    bytes_per_second: limit.bytes_per_second,
                })
                .collect(),
        }
    }
}

/// The `bindings --json` array.
pub fn bindings_json(bindings: &[ChannelBinding]) -> serde_json::Value {
    serde_json::Value::Array(bindings.iter().map(binding_json).collect())
}

/// The `binding --json` object.
pub fn binding_json(binding: &ChannelBinding) -> serde_json::Value {
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_value(BindingJson::from(binding)).unwrap_or_default()
}

/// One binding for people.
pub fn binding_text(binding: &ChannelBinding) -> String {
    let usage = usage_of(binding);
    fields(&[
        ("client", binding.client.clone()),
        ("listener", binding.listener.clone()),
        ("channel", channel_hex(binding.channel)),
        ("peer", binding.peer.clone()),
        ("allocation port", binding.allocation_port.to_string()),
        ("don't fragment", dont_fragment(binding.dont_fragment)),
        ("lifetime", lifetime(binding.lifetime_ms)),
        ("to peer", traffic_cell(&usage.client_to_peer)),
        ("to client", traffic_cell(&usage.peer_to_client)),
        (
            "dropped to peer",
            traffic_cell(&usage.dropped_client_to_peer),
        ),
        (
            "dropped to client",
            traffic_cell(&usage.dropped_peer_to_client),
        ),
        ("rate limits", limits_cell(binding)),
    ])
}

/// The `counters` table (REASON, VERDICT, PACKETS, BYTES; zero rows only
/// with `all`), the relayed, redirected, reported and lost totals and the
/// bindings that expired.
pub fn counters_text(counters: &CountersResponse, all: bool) -> String {
    let rows: Vec<Vec<String>> = counters
        .counters
        .iter()
        .filter(|c| all || c.packets != 0 || c.bytes != 0)
        .map(|c| {
            vec![
                c.reason.clone(),
                c.verdict.clone(),
                c.packets.to_string(),
                c.bytes.to_string(),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() && !counters.counters.is_empty() {
        "every counter is zero (--all lists them)\n".to_owned()
    } else {
        let header = [
            ("REASON", Align::Left),
            ("VERDICT", Align::Left),
            ("PACKETS", Align::Right),
            ("BYTES", Align::Right),
        ];
        table(&header, &rows)
    };
    out.push('\n');
    out += &fields(&[
        ("relayed packets", counters.relayed_packets.to_string()),
        ("relayed bytes", counters.relayed_bytes.to_string()),
        (
            "redirected packets",
            counters.redirected_packets.to_string(),
        ),
        ("redirected bytes", counters.redirected_bytes.to_string()),
        ("reported bytes", counters.reported_bytes.to_string()),
        ("lost events", counters.lost_events.to_string()),
        ("expired bindings", counters.expired_bindings.to_string()),
    ]);
    out
}

#[derive(Debug, Serialize)]
struct CounterJson<'a> {
    reason: &'a str,
    verdict: &'a str,
    packets: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct CountersJson<'a> {
    counters: Vec<CounterJson<'a>>,
    relayed_packets: u64,
    relayed_bytes: u64,
    redirected_packets: u64,
    redirected_bytes: u64,
    reported_bytes: u64,
    lost_events: u64,
    expired_bindings: u64,
}

/// The `counters --json` object; it always holds every counter, zero or not,
/// so that its shape does not depend on traffic.
pub fn counters_json(counters: &CountersResponse) -> serde_json::Value {
    let json = CountersJson {
        counters: counters
            .counters
            .iter()
            .map(|c| CounterJson {
                reason: &c.reason,
                verdict: &c.verdict,
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect(),
        relayed_packets: counters.relayed_packets,
        relayed_bytes: counters.relayed_bytes,
        redirected_packets: counters.redirected_packets,
        redirected_bytes: counters.redirected_bytes,
        reported_bytes: counters.reported_bytes,
        lost_events: counters.lost_events,
        expired_bindings: counters.expired_bindings,
    };
    serde_json::to_value(json).unwrap_or_default()
}

/// An address the agent sends as "" when there is none.
fn optional(address: &str) -> Option<&str> {
    (!address.is_empty()).then_some(address)
}

/// The data-plane configuration for people.
pub fn config_text(config: &DataPlaneConfig) -> String {
    let listeners = if config.listeners.is_empty() {
        "none".to_owned()
    } else {
        config.listeners.join(", ")
    };
    fields(&[
        ("listeners", listeners),
        (
            "allocation ports",
            format!("{}-{}", config.port_min, config.port_max),
        ),
        (
            "relay IPv4",
            optional(&config.relay_ipv4).unwrap_or("none").to_owned(),
        ),
        (
            "relay IPv6",
            optional(&config.relay_ipv6).unwrap_or("none").to_owned(),
        ),
        (
            "tail adjust",
            if config.tail_adjust { "on" } else { "off" }.to_owned(),
        ),
        (
            "next hop",
            optional(&config.next_hop).unwrap_or("unknown").to_owned(),
        ),
    ])
}

#[derive(Debug, Serialize)]
struct ConfigJson<'a> {
    listeners: &'a [String],
    port_min: u32,
    port_max: u32,
    relay_ipv4: Option<&'a str>,
    relay_ipv6: Option<&'a str>,
    tail_adjust: bool,
    next_hop: Option<&'a str>,
}

/// The `config --json` object; a family without a relay address, and a next
/// hop the agent does not name, are null.
pub fn config_json(config: &DataPlaneConfig) -> serde_json::Value {
    let json = ConfigJson {
        listeners: &config.listeners,
        port_min: config.port_min,
        port_max: config.port_max,
        relay_ipv4: optional(&config.relay_ipv4),
        relay_ipv6: optional(&config.relay_ipv6),
        tail_adjust: config.tail_adjust,
        next_hop: optional(&config.next_hop),
    };
    serde_json::to_value(json).unwrap_or_default()
}

/// A duration as "3d 4h 5m 6s", leaving out leading zero units.
pub fn uptime(seconds: u64) -> String {
    let units = [
        (seconds / 86_400, "d"),
        (seconds / 3_600 % 24, "h"),
        (seconds / 60 % 60, "m"),
        (seconds % 60, "s"),
    ];
    let first = units
        .iter()
        .position(|(value, _)| *value != 0)
        .unwrap_or(units.len() - 1);
    units[first..]
        .iter()
        .map(|(value, unit)| format!("{value}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The agent's health for people.
pub fn health_text(health: &HealthResponse) -> String {
    let attachments = if health.attachments.is_empty() {
        "none".to_owned()
    } else {
        health
            .attachments
            .iter()
            .map(|a| format!("{} ({})", a.interface, a.mode))
            .collect::<Vec<_>>()
            .join(", ")
    };
    fields(&[
        ("version", health.version.clone()),
        ("attached to", attachments),
        ("generation", health.generation.to_string()),
        (
            "bindings",
            format!("{} of {}", health.installed, health.capacity),
        ),
        ("uptime", uptime(health.uptime_seconds)),
        (
            "adopted",
            if health.adopted {
                "yes (program and maps kept from a previous run)"
            } else {
                "no"
            }
            .to_owned(),
        ),
    ])
}

#[derive(Debug, Serialize)]
struct AttachmentJson<'a> {
    interface: &'a str,
    mode: &'a str,
}

#[derive(Debug, Serialize)]
struct HealthJson<'a> {
    version: &'a str,
    attachments: Vec<AttachmentJson<'a>>,
    generation: u64,
    installed: u64,
    capacity: u64,
    uptime_seconds: u64,
    adopted: bool,
}

/// The `health --json` object.
pub fn health_json(health: &HealthResponse) -> serde_json::Value {
    let json = HealthJson {
        version: &health.version,
        attachments: health
            .attachments
            .iter()
            .map(|a| AttachmentJson {
                interface: &a.interface,
                mode: &a.mode,
            })
            .collect(),
        generation: health.generation,
        installed: health.installed,
        capacity: health.capacity,
        uptime_seconds: health.uptime_seconds,
        adopted: health.adopted,
    };
    serde_json::to_value(json).unwrap_or_default()
}

/// JSON as printed: pretty, with a final newline.
pub fn json_text(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use proto::v1::{Attachment, Counter};
    use serde_json::json;

    use super::*;

    fn binding(client: &str, channel: u32, peer: &str, port: u32) -> ChannelBinding {
        on("203.0.113.10:3478", client, channel, peer, port)
    }

    /// A binding that relayed and dropped traffic, under one rate limit.
    fn used(binding: ChannelBinding) -> ChannelBinding {
        let traffic = |packets, bytes| Some(proto::v1::Traffic { packets, bytes });
        ChannelBinding {
            usage: Some(proto::v1::Usage {
                client_to_peer: traffic(12, 3400),
                peer_to_client: traffic(10, 1000),
                dropped_client_to_peer: traffic(2, 200),
                dropped_peer_to_client: traffic(1, 100),
            }),
            rate_limits: vec![proto::v1::RateLimit {
                meter: "#00000000000000ab".to_owned(),
                bytes_per_second: 125_000,
            }],
            ..binding
        }
    }

    fn on(listener: &str, client: &str, channel: u32, peer: &str, port: u32) -> ChannelBinding {
        ChannelBinding {
            client: client.to_owned(),
            channel,
            peer: peer.to_owned(),
            allocation_port: port,
            listener: listener.to_owned(),
            lifetime_ms: 287_000,
            dont_fragment: false,
            ..Default::default()
        }
    }

    #[test]
    fn bindings_table_is_aligned_with_a_count() {
        let bindings = [
            used(binding(
                "192.0.2.2:40000",
                0x4001,
                "198.51.100.2:5000",
                49160,
            )),
            ChannelBinding {
                dont_fragment: true,
                ..on(
                    "[2001:db8:2::a]:3478",
                    "[2001:db8:1::2]:40000",
                    0x4fff,
                    "203.0.113.99:6",
                    65535,
                )
            },
        ];
        let expected = "\
CLIENT                 LISTENER              CHANNEL  PEER                PORT  DF   LIFETIME  TO-PEER  TO-CLIENT  DROPPED      LIMIT
192.0.2.2:40000        203.0.113.10:3478     0x4001   198.51.100.2:5000  49160  no       287s  12/3400    10/1000    3/300  125000B/s
[2001:db8:1::2]:40000  [2001:db8:2::a]:3478  0x4fff   203.0.113.99:6     65535  yes      287s      0/0        0/0      0/0          -
2 bindings
";
        assert_eq!(bindings_table(&bindings), expected);
    }

    #[test]
    fn bindings_table_right_aligns_ports_and_counts_one() {
        let bindings = [ChannelBinding {
            lifetime_ms: 0,
            ..on("192.0.2.1:443", "192.0.2.2:1", 0x4000, "198.51.100.2:2", 7)
        }];
        let expected = "\
CLIENT       LISTENER       CHANNEL  PEER            PORT  DF  LIFETIME  TO-PEER  TO-CLIENT  DROPPED  LIMIT
192.0.2.2:1  192.0.2.1:443  0x4000   198.51.100.2:2     7  no   expired      0/0        0/0      0/0      -
1 binding
";
        assert_eq!(bindings_table(&bindings), expected);
        assert_eq!(bindings_table(&[]), "0 bindings\n");
    }

    #[test]
    fn bindings_sort_by_client_address_then_listener_then_channel() {
        let mut bindings = vec![
            binding("192.0.2.10:1", 0x4000, "p", 1),
            binding("garbage", 0x4000, "p", 1),
            on("203.0.113.10:443", "192.0.2.9:1", 0x4000, "p", 1),
            binding("192.0.2.9:1", 0x4002, "p", 1),
            on("garbage", "192.0.2.9:1", 0x4000, "p", 1),
            binding("192.0.2.9:1", 0x4001, "p", 1),
            on("203.0.113.9:3478", "192.0.2.9:1", 0x4003, "p", 1),
            binding("[2001:db8::1]:1", 0x4000, "p", 1),
        ];
        sort_bindings(&mut bindings);
        let order: Vec<_> = bindings
            .iter()
            .map(|b| (b.client.as_str(), b.listener.as_str(), b.channel))
            .collect();
        assert_eq!(
            order,
            [
                ("192.0.2.9:1", "203.0.113.9:3478", 0x4003),
                ("192.0.2.9:1", "203.0.113.10:443", 0x4000),
                ("192.0.2.9:1", "203.0.113.10:3478", 0x4001),
                ("192.0.2.9:1", "203.0.113.10:3478", 0x4002),
                ("192.0.2.9:1", "garbage", 0x4000),
                ("192.0.2.10:1", "203.0.113.10:3478", 0x4000),
                ("[2001:db8::1]:1", "203.0.113.10:3478", 0x4000),
                ("garbage", "203.0.113.10:3478", 0x4000),
            ]
        );
    }

    #[test]
    fn bindings_json_shape() {
        let bindings = [used(binding(
            "192.0.2.2:40000",
            0x4001,
            "198.51.100.2:5000",
            49160,
        ))];
        assert_eq!(
            bindings_json(&bindings),
            json!([{
                "client": "192.0.2.2:40000",
                "listener": "203.0.113.10:3478",
                "channel": 16385,
                "peer": "198.51.100.2:5000",
                "allocation_port": 49160,
                "dont_fragment": false,
                "lifetime_ms": 287000,
                "usage": {
                    "client_to_peer": {"packets": 12, "bytes": 3400},
                    "peer_to_client": {"packets": 10, "bytes": 1000},
                    "dropped_client_to_peer": {"packets": 2, "bytes": 200},
                    "dropped_peer_to_client": {"packets": 1, "bytes": 100},
                },
                "rate_limits": [{"meter": "#00000000000000ab", "bytes_per_second": 125000}],
            }])
        );
        assert_eq!(bindings_json(&[]), json!([]));
        assert_eq!(binding_json(&bindings[0]), bindings_json(&bindings)[0]);
    }

    #[test]
    fn binding_text_fields() {
        let text = binding_text(&binding(
            "192.0.2.2:40000",
            0x4001,
            "198.51.100.2:5000",
            49160,
        ));
        assert_eq!(
            text,
            "\
client             192.0.2.2:40000
listener           203.0.113.10:3478
channel            0x4001
peer               198.51.100.2:5000
allocation port    49160
don't fragment     no
lifetime           287s
to peer            0/0
to client          0/0
dropped to peer    0/0
dropped to client  0/0
rate limits        -
"
        );
    }

    #[test]
    fn lifetimes_round_up_to_seconds_until_they_pass() {
        assert_eq!(lifetime(287_000), "287s");
        assert_eq!(lifetime(286_001), "287s");
        assert_eq!(lifetime(1), "1s");
        assert_eq!(lifetime(3_600_000), "3600s");
        assert_eq!(lifetime(0), "expired");
    }

    fn counters() -> CountersResponse {
        let counter = |reason: &str, verdict: &str, packets, bytes| Counter {
            reason: reason.to_owned(),
            verdict: verdict.to_owned(),
            packets,
            bytes,
        };
        CountersResponse {
            counters: vec![
                counter("relay_client_to_peer_v4_v4", "tx", 12, 3456),
                counter("pass_not_udp", "pass", 0, 0),
                counter("drop_bad_length", "drop", 1, 60),
            ],
            relayed_packets: 12,
            relayed_bytes: 3456,
            reported_bytes: 3400,
            lost_events: 2,
            redirected_packets: 5,
            redirected_bytes: 1234,
            expired_bindings: 3,
        }
    }

    #[test]
    fn counters_hide_zero_rows_unless_all() {
        let expected = "\
REASON                      VERDICT  PACKETS  BYTES
relay_client_to_peer_v4_v4  tx            12   3456
drop_bad_length             drop           1     60

relayed packets     12
relayed bytes       3456
redirected packets  5
redirected bytes    1234
reported bytes      3400
lost events         2
expired bindings    3
";
        assert_eq!(counters_text(&counters(), false), expected);
        let all = counters_text(&counters(), true);
        assert!(
            all.contains("\npass_not_udp                pass           0      0\n"),
            "{all}"
        );
    }

    #[test]
    fn counters_all_zero_says_so() {
        let mut zero = counters();
        zero.counters.retain(|c| c.packets == 0);
        let text = counters_text(&zero, false);
        assert!(
            text.starts_with("every counter is zero (--all lists them)\n\n"),
            "{text}"
        );
    }

    #[test]
    fn counters_json_has_every_counter() {
        let json = counters_json(&counters());
        assert_eq!(json["counters"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            json["counters"][1],
            json!({"reason": "pass_not_udp", "verdict": "pass", "packets": 0, "bytes": 0})
        );
        assert_eq!(json["relayed_packets"], 12);
        assert_eq!(json["relayed_bytes"], 3456);
        assert_eq!(json["redirected_packets"], 5);
        assert_eq!(json["redirected_bytes"], 1234);
        assert_eq!(json["reported_bytes"], 3400);
        assert_eq!(json["lost_events"], 2);
        assert_eq!(json["expired_bindings"], 3);
    }

    #[test]
    fn config_text_and_json() {
        let mut config = DataPlaneConfig {
            listeners: vec!["0.0.0.0:3478".to_owned(), "203.0.113.10:443".to_owned()],
            port_min: 49152,
            port_max: 65535,
            relay_ipv4: "203.0.113.10".to_owned(),
            relay_ipv6: String::new(),
            tail_adjust: false,
            next_hop: "fib".to_owned(),
        };
        assert_eq!(
            config_text(&config),
            "\
listeners         0.0.0.0:3478, 203.0.113.10:443
allocation ports  49152-65535
relay IPv4        203.0.113.10
relay IPv6        none
tail adjust       off
next hop          fib
"
        );
        assert_eq!(
            config_json(&config),
            json!({
                "listeners": ["0.0.0.0:3478", "203.0.113.10:443"],
                "port_min": 49152,
                "port_max": 65535,
                "relay_ipv4": "203.0.113.10",
                "relay_ipv6": null,
                "tail_adjust": false,
                "next_hop": "fib",
            })
        );
        config.listeners.clear();
        config.next_hop = "mac-swap".to_owned();
        let text = config_text(&config);
        assert!(text.starts_with("listeners         none\n"), "{text}");
        assert!(text.ends_with("next hop          mac-swap\n"), "{text}");
        let json = config_json(&config);
        assert_eq!(json["listeners"], json!([]));
        assert_eq!(json["next_hop"], "mac-swap");
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(60), "1m 0s");
        assert_eq!(uptime(3_723), "1h 2m 3s");
        assert_eq!(uptime(90_000), "1d 1h 0m 0s");
        assert_eq!(uptime(u64::MAX), "213503982334601d 7h 0m 15s");
    }

    #[test]
    fn health_text_and_json() {
        let health = HealthResponse {
            version: "0.1.0".to_owned(),
            attachments: vec![
                Attachment {
                    interface: "x0".to_owned(),
                    mode: "native".to_owned(),
                },
                Attachment {
                    interface: "x1".to_owned(),
                    mode: "generic".to_owned(),
                },
            ],
            generation: 7,
            installed: 2,
            capacity: 65536,
            uptime_seconds: 61,
            adopted: true,
        };
        let text = health_text(&health);
        assert!(
            text.contains("attached to  x0 (native), x1 (generic)\n"),
            "{text}"
        );
        assert!(text.contains("bindings     2 of 65536\n"), "{text}");
        assert!(text.contains("uptime       1m 1s\n"), "{text}");
        assert_eq!(
            health_json(&health),
            json!({
                "version": "0.1.0",
                "attachments": [
                    {"interface": "x0", "mode": "native"},
                    {"interface": "x1", "mode": "generic"},
                ],
                "generation": 7,
                "installed": 2,
                "capacity": 65536,
                "uptime_seconds": 61,
                "adopted": true,
            })
        );
    }

    #[test]
    fn json_text_ends_in_a_newline() {
        assert_eq!(json_text(&json!([])), "[]\n");
    }
}
