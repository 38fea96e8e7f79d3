//! turn-control's accounting records (`--accounting-file`) read back: one JSON object per
//! line, start, interim and stop of each allocation (the shared record format of
//! `turn_control_core::usage::UsageRecord`, read here without that crate so that the lab
//! checks what was written, not what the product's own decoder accepts).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

/// Packets and application bytes of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Application bytes (the ChannelData or DATA payload).
    pub bytes: u64,
}

impl Traffic {
    /// Counts one packet of `bytes`.
    pub fn count(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// Both counts added.
    pub fn plus(self, other: Traffic) -> Traffic {
        Traffic {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }

    /// Whether neither count exceeds `other`'s.
    pub fn within(self, other: Traffic) -> bool {
        self.packets <= other.packets && self.bytes <= other.bytes
    }

    fn parse(value: &Value, field: &str) -> anyhow::Result<Self> {
        let object = value.get(field).with_context(|| format!("no {field}"))?;
        let count = |name: &str| {
            object
                .get(name)
                .and_then(Value::as_u64)
                .with_context(|| format!("no {field}.{name}"))
        };
        Ok(Self {
            packets: count("packets")?,
            bytes: count("bytes")?,
        })
    }
}

/// One accounting record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// "start", "interim" or "stop".
    pub record: String,
    /// The allocation's records counted from 0.
    pub sequence: u64,
    /// The allocation's id, 16 hex digits.
    pub allocation: String,
    /// When the record was made.
    pub time: String,
    /// The USERNAME of the allocation.
    pub username: String,
    /// The user limits and records count it against.
    pub user: String,
    /// The realm.
    pub realm: String,
    /// The client's transport address.
    pub client: SocketAddr,
    /// "udp" or "tcp".
    pub transport: String,
    /// The listener the client reached.
    pub server: SocketAddr,
    /// The relayed transport addresses.
    pub relay: Vec<SocketAddr>,
    /// When the allocation was made.
    pub started: String,
    /// Stop records: when it ended.
    pub ended: Option<String>,
    /// Stop records: why it ended.
    pub end_reason: Option<String>,
    /// The granted max_bps, `None` when unlimited.
    pub max_bps: Option<u64>,
    /// Relayed from the client, both paths.
    pub client_to_peer: Traffic,
    /// Relayed to the client, both paths.
    pub peer_to_client: Traffic,
    /// Dropped by the limits, from the client.
    pub dropped_client_to_peer: Traffic,
    /// Dropped by the limits, to the client.
    pub dropped_peer_to_client: Traffic,
    /// The kernel's part of `client_to_peer`.
    pub kernel_client_to_peer: Traffic,
    /// The kernel's part of `peer_to_client`.
    pub kernel_peer_to_client: Traffic,
    /// Stop records: whether the kernel's final figures all came in.
    pub kernel_final: Option<bool>,
}

impl Record {
    /// Parses one line.
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        Self::from_value(&value).with_context(|| format!("not a record: {line}"))
    }

    fn from_value(value: &Value) -> anyhow::Result<Self> {
        let text = |field: &str| {
            value
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("no {field}"))
        };
        let optional_text =
            |field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
        let address = |field: &str| -> anyhow::Result<SocketAddr> { Ok(text(field)?.parse()?) };
        let relay = value
            .get("relay")
            .and_then(Value::as_array)
            .context("no relay")?
            .iter()
            .map(|address| Ok(address.as_str().context("relay not text")?.parse()?))
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let max_bps = match value.get("max_bps") {
            Some(Value::Null) => None,
            Some(number) => Some(number.as_u64().context("max_bps not a number")?),
            None => bail!("no max_bps"),
        };
        Ok(Self {
            record: text("record")?,
            sequence: value
                .get("sequence")
                .and_then(Value::as_u64)
                .context("no sequence")?,
            allocation: text("allocation")?,
            time: text("time")?,
            username: text("username")?,
            user: text("user")?,
            realm: text("realm")?,
            client: address("client")?,
            transport: text("transport")?,
            server: address("server")?,
            relay,
            started: text("started")?,
            ended: optional_text("ended"),
            end_reason: optional_text("end_reason"),
            max_bps,
            client_to_peer: Traffic::parse(value, "client_to_peer")?,
            peer_to_client: Traffic::parse(value, "peer_to_client")?,
            dropped_client_to_peer: Traffic::parse(value, "dropped_client_to_peer")?,
            dropped_peer_to_client: Traffic::parse(value, "dropped_peer_to_client")?,
            kernel_client_to_peer: Traffic::parse(value, "kernel_client_to_peer")?,
            kernel_peer_to_client: Traffic::parse(value, "kernel_peer_to_client")?,
            kernel_final: value.get("kernel_final").and_then(Value::as_bool),
        })
    }
}

/// Every complete record in the file at `path` (none while it does not exist); a last line
/// still being written (no newline yet) is left for the next read.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(Record::parse)
        .collect()
}

/// The records of the allocation of `client` relayed at `relay`, in the order written.
pub fn of_allocation(records: &[Record], client: SocketAddr, relay: SocketAddr) -> Vec<Record> {
    let Some(id) = records
        .iter()
        .find(|record| record.client == client && record.relay.contains(&relay))
        .map(|record| record.allocation.clone())
    else {
        return Vec::new();
    };
    records
        .iter()
        .filter(|record| record.allocation == id)
        .cloned()
        .collect()
}
