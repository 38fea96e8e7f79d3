//! The host's own addresses, which no peer may be (coturn CVE-2020-26262's class): a relayed
//! datagram leaves from the relay's address, so a service of the host bound to `0.0.0.0` or
//! `[::]` (DNS, SNMP, metrics) would take it for local traffic, on whichever address of the
//! host it is sent to. The relay address is only one of them: a host has a second IPv4
//! address, SLAAC and temporary IPv6 addresses, addresses that come and go.
//!
//! [`watch`] learns every address of every interface, of both families, with the broadcast
//! address of each IPv4 subnet, through rtnetlink, and follows them while the daemon runs
//! ([`daemon::addresses::follow`], as xdp-agent does).
//! The main thread hands each change to every event loop's core
//! ([`crate::threads::Control::OwnAddresses`]), whose peer policy refuses them all. Without
//! netlink the configured addresses ([`with_configured`]) are all the policy knows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use daemon::addresses::{self, AddressTable, Ended};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
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
        match addresses::follow(updates.closed(), |table: &HostTable| {
            publish(&updates, table)
        })
        .await
        {
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

/// Hands the table's addresses to `updates` if they changed; whether anyone listens.
fn publish(updates: &watch::Sender<Learned>, table: &HostTable) -> bool {
    let addresses = table.addresses();
    updates.send_if_modified(|learned| {
        if learned.as_ref() == Some(&addresses) {
            return false;
        }
        tracing::debug!(?addresses, "host addresses");
        *learned = Some(addresses);
        true
    });
    !updates.is_closed()
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

/// An address of an interface as rtnetlink names it: interface, address, prefix length.
type AddressKey = (u32, IpAddr, u8);

/// Every address of every interface, with its subnet's broadcast address (IPv4).
#[derive(Debug, Default)]
struct HostTable {
    addresses: BTreeMap<AddressKey, Option<IpAddr>>,
}

impl AddressTable for HostTable {
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
}

impl HostTable {
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
        let mut table = HostTable::default();
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
        let mut table = HostTable::default();
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
