//! The host's own addresses, which no peer may be (coturn CVE-2020-26262's class): a relayed
//! datagram leaves from the relay's address, so a service of the host bound to `0.0.0.0` or
//! `[::]` (DNS, SNMP, metrics) would take it for local traffic, on whichever address of the
//! host it is sent to. The relay address is only one of them: a host has a second IPv4
//! address, SLAAC and temporary IPv6 addresses, addresses that come and go.
//!
//! [`watch`] learns every address of every interface, of both families, with the broadcast
//! address of each IPv4 subnet, through rtnetlink, and follows them while the daemon runs:
//! it joins the kernel's IPv4 and IPv6 address groups *before* it asks for a dump of every
//! address, on one socket, so that applying dump replies and notifications in the order
//! they come leaves no change unseen between the two (as xdp-agent's `addresses` does).
//! The main thread hands each change to every event loop's core
//! ([`crate::threads::Control::OwnAddresses`]), whose peer policy refuses them all. Without
//! netlink the configured addresses ([`with_configured`]) are all the policy knows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};
use tokio::sync::watch;

use crate::config::Settings;

/// The host's addresses as last learned; `None` until the first dump is complete.
pub type Learned = Option<BTreeSet<IpAddr>>;

/// How long [`watch`] waits before it tries again after netlink failed.
const RETRY: Duration = Duration::from_secs(10);

/// Follows the host's addresses into `updates`: the complete set once the first dump is in,
/// then again on every change, until every receiver is gone. A netlink failure is logged and
/// tried again after [`RETRY`], the last set staying in force meanwhile.
///
/// The netlink socket belongs to the network namespace of the thread that polls the future.
pub async fn watch(updates: watch::Sender<Learned>) {
    loop {
        match follow(&updates).await {
            Ok(Ended::Closed) => return,
            Ok(Ended::Overrun) => {
                tracing::warn!(
                    "netlink address notifications were lost; learning the host's addresses again"
                );
            }
            Err(error) => {
                tracing::warn!(
                    error = %format!("{error:#}"),
                    "cannot follow the host's addresses; the peer policy keeps the last ones known (at start: the configured ones)"
                );
                tokio::select! {
                    () = updates.closed() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// What the peer policy refuses: the `learned` addresses and the configured relay addresses
/// (which need not be on an interface: an address routed to the host, or not yet up).
pub fn with_configured(settings: &Settings, learned: Option<&BTreeSet<IpAddr>>) -> Vec<IpAddr> {
    let configured = settings
        .relay_ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(settings.relay_ipv6.map(IpAddr::V6));
    let all: BTreeSet<IpAddr> = configured
        .chain(learned.into_iter().flatten().copied())
        .collect();
    all.into_iter().collect()
}

/// Why [`follow`] returned.
#[derive(Debug)]
enum Ended {
    /// Nobody listens any more.
    Closed,
    /// The kernel dropped notifications; the table may be stale.
    Overrun,
}

/// One socket's life: subscribe, dump, then apply notifications.
async fn follow(updates: &watch::Sender<Learned>) -> anyhow::Result<Ended> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
    let groups = libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(0, groups.unsigned_abs()))
        .context("cannot join the netlink address groups")?;
    let mut table = AddressTable::default();
    let mut dump = Dump::request(&socket, 1).await?;
    loop {
        let received = tokio::select! {
            () = updates.closed() => return Ok(Ended::Closed),
            received = socket.recv_from_full() => received,
        };
        let (bytes, from) = match received {
            Ok(received) => received,
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                return Ok(Ended::Overrun);
            }
            Err(error) => return Err(error).context("cannot read from the netlink socket"),
        };
        // Only the kernel (port 0) speaks for the address table.
        if from.port_number() != 0 {
            continue;
        }
        for message in messages(&bytes) {
            let message = message.context("malformed netlink message")?;
            if let Some(ended) = dump.apply(message, &mut table)? {
                return Ok(ended);
            }
        }
        if dump.running {
            continue;
        }
        if dump.interrupted {
            // The table changed while the kernel walked it: the dump may have skipped an
            // address that did not change (and so sent no notification). Asking again
            // suffices; notifications kept everything else current.
            tracing::debug!("the address dump was interrupted; dumping again");
            dump = Dump::request(&socket, dump.sequence.wrapping_add(1)).await?;
            continue;
        }
        let addresses = table.addresses();
        updates.send_if_modified(|learned| {
            if learned.as_ref() == Some(&addresses) {
                return false;
            }
            tracing::debug!(?addresses, "host addresses");
            *learned = Some(addresses);
            true
        });
    }
}

/// An address dump in flight.
#[derive(Debug)]
struct Dump {
    sequence: u32,
    running: bool,
    interrupted: bool,
}

impl Dump {
    /// Applies a dump reply or a notification to `table`, keeping track of this dump;
    /// `Some` when the socket's life ends.
    fn apply(
        &mut self,
        message: NetlinkMessage<RouteNetlinkMessage>,
        table: &mut AddressTable,
    ) -> anyhow::Result<Option<Ended>> {
        let ours = message.header.sequence_number == self.sequence && self.running;
        if ours && message.header.flags & NLM_F_DUMP_INTR != 0 {
            self.interrupted = true;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                table.apply(&address, true);
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(address)) => {
                table.apply(&address, false);
            }
            NetlinkPayload::Done(_) if ours => self.running = false,
            NetlinkPayload::Error(error) if ours && error.code.is_some() => {
                return Err(error.to_io()).context("the kernel refused the address dump");
            }
            NetlinkPayload::Overrun(_) => return Ok(Some(Ended::Overrun)),
            _ => {}
        }
        Ok(None)
    }

    /// Asks the kernel for every address of every family.
    async fn request(socket: &TokioSocket, sequence: u32) -> anyhow::Result<Self> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = sequence;
        let payload = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        socket
            .send_to(&buffer, &SocketAddr::new(0, 0))
            .await
            .context("cannot ask the kernel for its addresses")?;
        Ok(Self {
            sequence,
            running: true,
            interrupted: false,
        })
    }
}

/// The netlink messages in one datagram.
fn messages(
    mut bytes: &[u8],
) -> impl Iterator<Item = anyhow::Result<NetlinkMessage<RouteNetlinkMessage>>> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let result = NetlinkBuffer::new_checked(bytes)
            .map_err(anyhow::Error::from)
            .and_then(|buffer| {
                // new_checked guarantees 16 <= length <= bytes.len().
                let length = buffer.length() as usize;
                let message = NetlinkMessage::deserialize(&bytes[..length])?;
                // Messages are 4-byte aligned; the last one may lack padding.
                bytes = bytes.get(length.next_multiple_of(4)..).unwrap_or_default();
                Ok(message)
            });
        if result.is_err() {
            // Nothing after a malformed header can be framed.
            bytes = &[];
        }
        Some(result)
    })
}

/// An address of an interface as rtnetlink names it: interface, address, prefix length.
type AddressKey = (u32, IpAddr, u8);

/// Every address of every interface, with its subnet's broadcast address (IPv4).
#[derive(Debug, Default)]
struct AddressTable {
    addresses: BTreeMap<AddressKey, Option<IpAddr>>,
}

impl AddressTable {
    /// Applies RTM_NEWADDR (`present`) or RTM_DELADDR. The same address on two interfaces
    /// is two entries: removing one leaves it the host's.
    fn apply(&mut self, message: &AddressMessage, present: bool) {
        let Some((key, broadcast)) = address_of(message) else {
            return;
        };
        if present {
            self.addresses.insert(key, broadcast);
        } else {
            self.addresses.remove(&key);
        }
    }

    /// The host's addresses: every interface address and broadcast address.
    fn addresses(&self) -> BTreeSet<IpAddr> {
        self.addresses
            .iter()
            .flat_map(|(&(_, ip, _), &broadcast)| std::iter::once(ip).chain(broadcast))
            .collect()
    }
}

/// The address an RTM_NEWADDR/RTM_DELADDR message is about, and its broadcast address.
fn address_of(message: &AddressMessage) -> Option<(AddressKey, Option<IpAddr>)> {
    let (mut local, mut address, mut broadcast) = (None, None, None);
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Broadcast(ip) => broadcast = Some(IpAddr::V4(*ip)),
            _ => {}
        }
    }
    // IFA_LOCAL is the host's own address; IFA_ADDRESS differs from it only on
    // point-to-point links, where it is the far end.
    let ip = local.or(address)?;
    Some((
        (message.header.index, ip, message.header.prefix_len),
        broadcast,
    ))
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::AddressFamily;

    use super::*;

    fn message(index: u32, ip: &str, prefix_len: u8, broadcast: Option<&str>) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap();
        let mut message = AddressMessage::default();
        message.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        message.header.index = index;
        message.header.prefix_len = prefix_len;
        message.attributes.push(AddressAttribute::Address(ip));
        message.attributes.push(AddressAttribute::Local(ip));
        if let Some(broadcast) = broadcast {
            let broadcast = broadcast.parse().unwrap();
            message
                .attributes
                .push(AddressAttribute::Broadcast(broadcast));
        }
        message
    }

    fn set(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn the_table_follows_new_and_deleted_addresses() {
        let mut table = AddressTable::default();
        table.apply(&message(1, "127.0.0.1", 8, None), true);
        table.apply(&message(2, "203.0.113.10", 24, Some("203.0.113.255")), true);
        table.apply(&message(2, "2001:db8:2::a", 64, None), true);
        // A SLAAC address and a temporary one of the same prefix.
        table.apply(&message(2, "2001:db8:2::5054:ff:fe12:3456", 64, None), true);
        table.apply(
            &message(2, "2001:db8:2::8d1c:27a5:b3e0:914f", 64, None),
            true,
        );
        assert_eq!(
            table.addresses(),
            set(&[
                "127.0.0.1",
                "203.0.113.10",
                "203.0.113.255",
                "2001:db8:2::a",
                "2001:db8:2::5054:ff:fe12:3456",
                "2001:db8:2::8d1c:27a5:b3e0:914f",
            ])
        );
        // The temporary address expires.
        table.apply(
            &message(2, "2001:db8:2::8d1c:27a5:b3e0:914f", 64, None),
            false,
        );
        assert!(
            !table
                .addresses()
                .contains(&"2001:db8:2::8d1c:27a5:b3e0:914f".parse().unwrap())
        );
        // The same address on two interfaces stays while one holds it.
        table.apply(&message(3, "203.0.113.10", 32, None), true);
        table.apply(
            &message(2, "203.0.113.10", 24, Some("203.0.113.255")),
            false,
        );
        assert!(table.addresses().contains(&"203.0.113.10".parse().unwrap()));
        assert!(
            !table
                .addresses()
                .contains(&"203.0.113.255".parse().unwrap())
        );
    }

    #[test]
    fn point_to_point_links_name_the_local_end() {
        let mut message = message(4, "192.0.2.1", 32, None);
        message.attributes = vec![
            AddressAttribute::Address("192.0.2.2".parse().unwrap()),
            AddressAttribute::Local("192.0.2.1".parse().unwrap()),
        ];
        let mut table = AddressTable::default();
        table.apply(&message, true);
        assert_eq!(table.addresses(), set(&["192.0.2.1"]));
    }

    /// The real thing, unprivileged: the dump holds loopback, and every address `ip` shows.
    #[tokio::test]
    async fn the_first_dump_has_the_hosts_addresses() {
        let (tx, mut rx) = watch::channel(None);
        let task = tokio::spawn(watch(tx));
        let learned = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("the first dump within 10 s")
            .expect("the watcher runs")
            .clone()
            .unwrap_or_default();
        assert!(
            learned.contains(&IpAddr::from([127, 0, 0, 1])),
            "{learned:?}"
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the watcher ends with its receivers")
            .unwrap();
    }
}
