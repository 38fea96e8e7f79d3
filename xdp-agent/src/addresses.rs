//! The relay's own addresses, learned from its interfaces through rtnetlink
//! and followed while the agent runs, so that an address added, removed or
//! renumbered by the operator (or by DHCP or SLAAC) reaches the data plane
//! without a restart.
//!
//! [`watch`] follows them ([`daemon::addresses::follow`]: subscribed before
//! the dump, so that no change goes unseen between the two). [`choose`] then picks one address per family; [`Learned`]
//! also keeps every address of the attached interfaces (what turn-control may
//! name as a relay address) and of the host (what no binding may reach).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use daemon::addresses::{self, AddressTable, Ended};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use tokio::sync::watch;
use tracing::{debug, warn};

/// The addresses the relay answers on, one per family at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayAddresses {
    /// The relay's IPv4 address, if it relays IPv4.
    pub relay_ipv4: Option<Ipv4Addr>,
    /// The relay's IPv6 address, if it relays IPv6.
    pub relay_ipv6: Option<Ipv6Addr>,
}

/// What the agent learns from the host's addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// The relay addresses [`choose`] picks on the attached interfaces.
    pub relay: RelayAddresses,
    /// Every address of the attached interfaces, usable or not.
    pub attached: BTreeSet<IpAddr>,
    /// Every address of every interface of the host (of its network
    /// namespace), the attached ones included.
    pub host: BTreeSet<IpAddr>,
}

impl Learned {
    /// What a snapshot of the host's addresses says, for the attached
    /// `interfaces` (by ifindex, in order of preference).
    pub fn new(interfaces: &[u32], addresses: &[InterfaceAddress]) -> Self {
        Self {
            relay: choose(interfaces, addresses),
            attached: addresses
                .iter()
                .filter(|a| interfaces.contains(&a.ifindex))
                .map(|a| a.ip)
                .collect(),
            host: addresses.iter().map(|a| a.ip).collect(),
        }
    }
}

/// An address assigned to an interface, as rtnetlink reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The interface's index.
    pub ifindex: u32,
    /// The local address (IFA_LOCAL, else IFA_ADDRESS: they differ only on
    /// point-to-point links, where IFA_ADDRESS is the far end).
    pub ip: IpAddr,
    /// The prefix length of the address's subnet.
    pub prefix_len: u8,
    /// IFA_F_* flags: secondary (IPv6: temporary), tentative, deprecated...
    pub flags: AddressFlags,
}

impl InterfaceAddress {
    /// Whether the relay may use the address as its own: a unicast address
    /// of global or private scope that is neither on its way in (IPv6
    /// duplicate address detection) nor on its way out (deprecated).
    pub fn is_usable(&self) -> bool {
        let unusable = AddressFlags::Tentative | AddressFlags::Dadfailed | AddressFlags::Deprecated;
        if self.flags.intersects(unusable) {
            return false;
        }
        match self.ip {
            IpAddr::V4(ip) => {
                !(ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_broadcast()
                    || ip.is_link_local()
                    || self.is_subnet_broadcast(ip))
            }
            IpAddr::V6(ip) => {
                !(ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_unicast_link_local())
            }
        }
    }

    /// Whether the address is its subnet's directed broadcast address (host
    /// bits all ones); /31 and /32 subnets have none (RFC 3021).
    fn is_subnet_broadcast(&self, ip: Ipv4Addr) -> bool {
        if self.prefix_len >= 31 {
            return false;
        }
        let host_mask = u32::MAX >> self.prefix_len;
        u32::from(ip) & host_mask == host_mask
    }

    fn is_secondary(&self) -> bool {
        self.flags.contains(AddressFlags::Secondary)
    }
}

/// Picks the relay's addresses from a snapshot: for each family, the first
/// usable address (see [`InterfaceAddress::is_usable`]) on the first of
/// `interfaces`, in their order, that has one; on an interface, primary
/// addresses come before secondary (IPv6: temporary) ones, each in the
/// snapshot's order.
pub fn choose(interfaces: &[u32], addresses: &[InterfaceAddress]) -> RelayAddresses {
    let mut chosen = RelayAddresses::default();
    for &ifindex in interfaces {
        let usable = |secondary: bool| {
            addresses.iter().filter(move |a| {
                a.ifindex == ifindex && a.is_secondary() == secondary && a.is_usable()
            })
        };
        for address in usable(false).chain(usable(true)) {
            match address.ip {
                IpAddr::V4(ip) if chosen.relay_ipv4.is_none() => chosen.relay_ipv4 = Some(ip),
                IpAddr::V6(ip) if chosen.relay_ipv6.is_none() => chosen.relay_ipv6 = Some(ip),
                _ => {}
            }
        }
    }
    chosen
}

/// Follows the host's addresses, `interfaces` (by ifindex, in order of
/// preference) being the attached ones: sends what is [`Learned`] at once,
/// then again whenever it changes, until every receiver of `updates` is gone (then `Ok`).
/// Netlink errors end it with an error; lost notifications (the socket's
/// buffer overran) only make it learn everything again.
///
/// The netlink socket belongs to the network namespace of the thread that
/// first polls the future.
pub async fn watch(interfaces: Vec<u32>, updates: watch::Sender<Learned>) -> anyhow::Result<()> {
    let mut sent = None;
    loop {
        let publish = |table: &InterfaceTable| publish(&interfaces, &updates, &mut sent, table);
        match addresses::follow(updates.closed(), publish).await? {
            Ended::Closed => return Ok(()),
            Ended::Overrun => {
                warn!("netlink address notifications were lost; learning the addresses again");
            }
        }
    }
}

/// Hands what `table` says to `updates` if it changed since `sent`; whether anyone listens.
fn publish(
    interfaces: &[u32],
    updates: &watch::Sender<Learned>,
    sent: &mut Option<Learned>,
    table: &InterfaceTable,
) -> bool {
    let learned = Learned::new(interfaces, &table.snapshot());
    if sent.as_ref() != Some(&learned) {
        debug!(relay_ipv4 = ?learned.relay.relay_ipv4, relay_ipv6 = ?learned.relay.relay_ipv6, host = ?learned.host, "host addresses");
        if updates.send(learned.clone()).is_err() {
            return false;
        }
        *sent = Some(learned);
    }
    true
}

/// The current addresses of every interface.
#[derive(Debug, Default)]
struct InterfaceTable {
    /// Per ifindex, in the order the kernel first reported them.
    interfaces: BTreeMap<u32, Vec<InterfaceAddress>>,
}

impl AddressTable for InterfaceTable {
    /// Applies RTM_NEWADDR (`present`) or RTM_DELADDR. An address is its
    /// interface, IP and prefix length: a new message for one that exists
    /// updates its flags in place (IPv6 DAD ending, a lifetime running out).
    fn apply(&mut self, message: &AddressMessage, present: bool) {
        let Some(address) = interface_address(message) else {
            return;
        };
        let addresses = self.interfaces.entry(address.ifindex).or_default();
        let same = |a: &InterfaceAddress| a.ip == address.ip && a.prefix_len == address.prefix_len;
        match (addresses.iter_mut().find(|a| same(a)), present) {
            (Some(existing), true) => *existing = address,
            (None, true) => addresses.push(address),
            (_, false) => addresses.retain(|a| !same(a)),
        }
        if addresses.is_empty() {
            self.interfaces.remove(&address.ifindex);
        }
    }
}

impl InterfaceTable {
    fn snapshot(&self) -> Vec<InterfaceAddress> {
        self.interfaces.values().flatten().copied().collect()
    }
}

/// The address an RTM_NEWADDR/RTM_DELADDR message is about, if it names one.
fn interface_address(message: &AddressMessage) -> Option<InterfaceAddress> {
    let (mut local, mut address, mut flags) = (None, None, None);
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            // IFA_FLAGS holds all 32 bits; the header only the low 8.
            AddressAttribute::Flags(all) => flags = Some(*all),
            _ => {}
        }
    }
    Some(InterfaceAddress {
        ifindex: message.header.index,
        ip: local.or(address)?,
        prefix_len: message.header.prefix_len,
        flags: flags.unwrap_or_else(|| {
            AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()))
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use netlink_packet_route::AddressFamily;
    use netlink_packet_route::address::AddressHeaderFlags;

    use super::*;

    fn address(ifindex: u32, ip: &str, prefix_len: u8, flags: AddressFlags) -> InterfaceAddress {
        InterfaceAddress {
            ifindex,
            ip: ip.parse().unwrap(),
            prefix_len,
            flags,
        }
    }

    fn plain(ifindex: u32, ip: &str) -> InterfaceAddress {
        let prefix_len = if ip.contains(':') { 64 } else { 24 };
        address(ifindex, ip, prefix_len, AddressFlags::Permanent)
    }

    fn relay(v4: Option<&str>, v6: Option<&str>) -> RelayAddresses {
        RelayAddresses {
            relay_ipv4: v4.map(|ip| ip.parse().unwrap()),
            relay_ipv6: v6.map(|ip| ip.parse().unwrap()),
        }
    }

    #[test]
    fn nothing_to_choose_from() {
        assert_eq!(choose(&[1], &[]), RelayAddresses::default());
        assert_eq!(
            choose(&[], &[plain(1, "192.0.2.1")]),
            RelayAddresses::default()
        );
        assert_eq!(
            choose(&[2], &[plain(1, "192.0.2.1")]),
            RelayAddresses::default()
        );
    }

    #[test]
    fn first_interface_in_the_given_order_wins_per_family() {
        let addresses = [
            plain(1, "192.0.2.1"),
            plain(1, "2001:db8:1::1"),
            plain(2, "198.51.100.2"),
            plain(3, "2001:db8:3::3"),
        ];
        assert_eq!(
            choose(&[1, 2], &addresses),
            relay(Some("192.0.2.1"), Some("2001:db8:1::1"))
        );
        assert_eq!(
            choose(&[2, 1], &addresses),
            relay(Some("198.51.100.2"), Some("2001:db8:1::1"))
        );
        assert_eq!(
            choose(&[3, 2, 1], &addresses),
            relay(Some("198.51.100.2"), Some("2001:db8:3::3"))
        );
    }

    #[test]
    fn first_address_of_an_interface_wins() {
        let addresses = [
            plain(1, "2001:db8::b"),
            plain(1, "192.0.2.2"),
            plain(1, "192.0.2.1"),
            plain(1, "2001:db8::a"),
        ];
        assert_eq!(
            choose(&[1], &addresses),
            relay(Some("192.0.2.2"), Some("2001:db8::b"))
        );
    }

    #[test]
    fn primary_before_secondary() {
        let secondary = AddressFlags::Secondary | AddressFlags::Permanent;
        let addresses = [
            address(1, "192.0.2.9", 24, secondary),
            address(1, "2001:db8::9", 64, secondary),
            plain(1, "192.0.2.1"),
            plain(1, "2001:db8::1"),
        ];
        assert_eq!(
            choose(&[1], &addresses),
            relay(Some("192.0.2.1"), Some("2001:db8::1"))
        );
        // A secondary is still better than nothing.
        assert_eq!(
            choose(&[1], &addresses[..2]),
            relay(Some("192.0.2.9"), Some("2001:db8::9"))
        );
    }

    #[test]
    fn unusable_addresses_are_skipped() {
        let unusable = [
            plain(1, "0.0.0.0"),
            plain(1, "127.0.0.1"),
            plain(1, "169.254.10.1"),
            plain(1, "224.0.0.5"),
            plain(1, "255.255.255.255"),
            address(1, "192.0.2.255", 24, AddressFlags::Permanent),
            address(1, "10.255.255.255", 8, AddressFlags::Permanent),
            plain(1, "::"),
            plain(1, "::1"),
            plain(1, "fe80::1"),
            plain(1, "febf::1"),
            plain(1, "ff02::1"),
            address(1, "2001:db8::1", 64, AddressFlags::Tentative),
            address(
                1,
                "2001:db8::2",
                64,
                AddressFlags::Dadfailed | AddressFlags::Tentative,
            ),
            address(1, "2001:db8::3", 64, AddressFlags::Deprecated),
            address(1, "192.0.2.3", 24, AddressFlags::Deprecated),
        ];
        for one in unusable {
            assert!(!one.is_usable(), "{one:?}");
        }
        let mut addresses = unusable.to_vec();
        addresses.push(plain(2, "198.51.100.1"));
        addresses.push(plain(2, "2001:db8:2::1"));
        assert_eq!(
            choose(&[1, 2], &addresses),
            relay(Some("198.51.100.1"), Some("2001:db8:2::1"))
        );
    }

    #[test]
    fn usable_edge_cases() {
        let usable = [
            // Host bits all ones is an address in /31 and /32 subnets.
            address(1, "192.0.2.255", 31, AddressFlags::Permanent),
            address(1, "192.0.2.255", 32, AddressFlags::Permanent),
            address(1, "192.0.2.254", 24, AddressFlags::Permanent),
            // The network address is usable (if odd), as are 169.255/16 and fec0::.
            address(1, "192.0.2.0", 24, AddressFlags::Permanent),
            plain(1, "169.255.0.1"),
            plain(1, "fec0::1"),
            // Optimistic DAD (RFC 4429) allows use; temporary is secondary.
            address(1, "2001:db8::4", 64, AddressFlags::Optimistic),
            address(1, "2001:db8::5", 64, AddressFlags::Secondary),
            address(1, "10.0.0.1", 8, AddressFlags::empty()),
        ];
        for one in usable {
            assert!(one.is_usable(), "{one:?}");
        }
    }

    fn message(
        ifindex: u32,
        family: AddressFamily,
        attributes: Vec<AddressAttribute>,
    ) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = family;
        message.header.index = ifindex;
        message.header.prefix_len = 24;
        message.attributes = attributes;
        message
    }

    #[test]
    fn messages_name_the_local_address_and_all_flags() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Point to point: IFA_LOCAL is ours, IFA_ADDRESS the far end's.
        let ptp = message(
            3,
            AddressFamily::Inet,
            vec![
                AddressAttribute::Address(ip("192.0.2.99")),
                AddressAttribute::Local(ip("192.0.2.1")),
            ],
        );
        let parsed = interface_address(&ptp).unwrap();
        assert_eq!(
            (parsed.ifindex, parsed.ip, parsed.prefix_len),
            (3, ip("192.0.2.1"), 24)
        );
        // IPv6 carries IFA_ADDRESS alone; IFA_FLAGS overrides the header's byte.
        let mut v6 = message(
            4,
            AddressFamily::Inet6,
            vec![
                AddressAttribute::Address(ip("2001:db8::1")),
                AddressAttribute::Flags(AddressFlags::Tentative | AddressFlags::StablePrivacy),
            ],
        );
        v6.header.flags = AddressHeaderFlags::Permanent;
        let parsed = interface_address(&v6).unwrap();
        assert_eq!(parsed.ip, ip("2001:db8::1"));
        assert_eq!(
            parsed.flags,
            AddressFlags::Tentative | AddressFlags::StablePrivacy
        );
        // Without IFA_FLAGS the header's flags count.
        v6.attributes.truncate(1);
        assert_eq!(
            interface_address(&v6).unwrap().flags,
            AddressFlags::Permanent
        );
        // No address, nothing to say.
        assert_eq!(
            interface_address(&message(4, AddressFamily::Inet6, vec![])),
            None
        );
    }

    #[test]
    fn table_follows_new_and_deleted_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let new = |ifindex, address: &str, flags| {
            message(
                ifindex,
                AddressFamily::Inet6,
                vec![
                    AddressAttribute::Address(ip(address)),
                    AddressAttribute::Flags(flags),
                ],
            )
        };
        let mut table = InterfaceTable::default();
        table.apply(&new(1, "2001:db8::1", AddressFlags::Tentative), true);
        table.apply(&new(9, "2001:db8::9", AddressFlags::empty()), true);
        table.apply(&new(2, "2001:db8::2", AddressFlags::empty()), true);
        assert_eq!(
            choose(&[1, 2], &table.snapshot()),
            relay(None, Some("2001:db8::2"))
        );
        // Interface 9 is not attached: its address is the host's, never the relay's.
        let learned = Learned::new(&[1, 2], &table.snapshot());
        assert_eq!(learned.relay, relay(None, Some("2001:db8::2")));
        assert_eq!(
            learned.attached,
            BTreeSet::from([ip("2001:db8::1"), ip("2001:db8::2")])
        );
        assert_eq!(
            learned.host,
            BTreeSet::from([ip("2001:db8::1"), ip("2001:db8::2"), ip("2001:db8::9")])
        );
        table.apply(&new(9, "2001:db8::9", AddressFlags::empty()), false);
        // DAD ends: the same address again, now without TENTATIVE.
        table.apply(&new(1, "2001:db8::1", AddressFlags::empty()), true);
        assert_eq!(table.snapshot().len(), 2);
        assert_eq!(
            choose(&[1, 2], &table.snapshot()),
            relay(None, Some("2001:db8::1"))
        );
        table.apply(&new(1, "2001:db8::1", AddressFlags::empty()), false);
        assert_eq!(
            choose(&[1, 2], &table.snapshot()),
            relay(None, Some("2001:db8::2"))
        );
        // Deleting what is not there changes nothing.
        table.apply(&new(2, "2001:db8::7", AddressFlags::empty()), false);
        assert_eq!(table.snapshot().len(), 1);
    }

    // Privileged: a real namespace, real links and `ip addr` changes.

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Whether this test can run; under CI=true it must.
    fn privileged() -> bool {
        if nix::unistd::Uid::effective().is_root() {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|ci| ci == "true");
        assert!(
            !ci,
            "CI=true but the privileged address test cannot run: not root"
        );
        eprintln!("SKIPPED: the netlink address test needs root; CI runs it");
        false
    }

    fn ip(args: &[&str]) {
        let output = Command::new("ip").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }

    /// A network namespace, deleted on drop (also when the test panics).
    struct Netns(String);

    impl Netns {
        fn new() -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "addrtest-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            Self(name)
        }

        fn ip(&self, args: &[&str]) {
            let mut all = vec!["-n", &self.0];
            all.extend_from_slice(args);
            ip(&all);
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Waits until the watch has sent `want`.
    fn expect(
        runtime: &tokio::runtime::Runtime,
        addresses: &mut watch::Receiver<Learned>,
        what: &str,
        want: RelayAddresses,
    ) {
        let reached = runtime.block_on(async {
            tokio::time::timeout(DEADLINE, addresses.wait_for(|a| a.relay == want)).await
        });
        let reached = reached.map(|r| r.map(|_| ()));
        assert!(
            matches!(reached, Ok(Ok(()))),
            "{what}: wanted {want:?}, have {:?} ({reached:?})",
            *addresses.borrow()
        );
    }

    #[test]
    fn follows_a_namespace_s_addresses() {
        if !privileged() {
            return;
        }
        let netns = Netns::new();
        // v0 (index 10) is preferred over w0 (index 11). v0's veth peer stays
        // down at first, so v0 has no carrier and its IPv6 addresses stay
        // tentative until it comes up.
        netns.ip(&[
            "link", "add", "w0", "index", "11", "type", "veth", "peer", "name", "w1",
        ]);
        netns.ip(&[
            "link", "add", "v0", "index", "10", "type", "veth", "peer", "name", "v1",
        ]);
        netns.ip(&["link", "set", "w0", "up"]);
        netns.ip(&["link", "set", "w1", "up"]);
        netns.ip(&["link", "set", "v0", "up"]);
        ip(&[
            "netns",
            "exec",
            &netns.0,
            "sysctl",
            "-qw",
            "net.ipv4.conf.v0.promote_secondaries=1",
        ]);

        let (updates, mut addresses) = watch::channel(Learned::default());
        let (done, ended) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{}", netns.0);
        std::thread::spawn(move || {
            let result = (|| {
                let file = File::open(&path)?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(watch(vec![10, 11], updates))
            })();
            let _ = done.send(result);
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();

        // The first choice comes at once, though nothing is usable: the
        // links' fe80:: addresses are link-local.
        let first =
            runtime.block_on(async { tokio::time::timeout(DEADLINE, addresses.changed()).await });
        assert!(matches!(first, Ok(Ok(()))), "no first choice: {first:?}");
        assert_eq!(
            addresses.borrow_and_update().relay,
            RelayAddresses::default()
        );

        // Link-local, tentative and deprecated addresses on v0 lose to w0's.
        netns.ip(&["addr", "add", "169.254.1.1/16", "dev", "v0"]);
        netns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "v0"]);
        netns.ip(&[
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            "v0",
            "nodad",
            "preferred_lft",
            "0",
        ]);
        netns.ip(&["addr", "add", "198.51.100.7/24", "dev", "w0"]);
        netns.ip(&["addr", "add", "2001:db8:2::7/64", "dev", "w0", "nodad"]);
        expect(
            &runtime,
            &mut addresses,
            "w0's addresses",
            relay(Some("198.51.100.7"), Some("2001:db8:2::7")),
        );

        // A usable IPv4 address on v0 wins; its secondary takes over when it goes.
        netns.ip(&["addr", "add", "192.0.2.1/24", "dev", "v0"]);
        netns.ip(&["addr", "add", "192.0.2.2/24", "dev", "v0"]);
        expect(
            &runtime,
            &mut addresses,
            "v0's primary",
            relay(Some("192.0.2.1"), Some("2001:db8:2::7")),
        );
        netns.ip(&["addr", "del", "192.0.2.1/24", "dev", "v0"]);
        expect(
            &runtime,
            &mut addresses,
            "v0's promoted secondary",
            relay(Some("192.0.2.2"), Some("2001:db8:2::7")),
        );

        // Carrier: DAD runs and v0's tentative address becomes usable.
        netns.ip(&["link", "set", "v1", "up"]);
        expect(
            &runtime,
            &mut addresses,
            "v0's IPv6 after DAD",
            relay(Some("192.0.2.2"), Some("2001:db8:1::1")),
        );
        netns.ip(&["addr", "del", "2001:db8:1::1/64", "dev", "v0"]);
        expect(
            &runtime,
            &mut addresses,
            "w0's IPv6 again",
            relay(Some("192.0.2.2"), Some("2001:db8:2::7")),
        );

        // A link that goes takes its addresses along.
        netns.ip(&["link", "del", "w0"]);
        expect(
            &runtime,
            &mut addresses,
            "w0 deleted",
            relay(Some("192.0.2.2"), None),
        );

        // An address of an interface that is not attached is the host's alone.
        netns.ip(&["addr", "add", "203.0.113.99/24", "dev", "v1"]);
        let other: IpAddr = "203.0.113.99".parse().unwrap();
        let seen = runtime.block_on(async {
            let seen = addresses.wait_for(|a| a.host.contains(&other));
            matches!(tokio::time::timeout(DEADLINE, seen).await, Ok(Ok(_)))
        });
        assert!(seen, "{:?}", *addresses.borrow());
        let learned = addresses.borrow().clone();
        assert!(!learned.attached.contains(&other), "{learned:?}");
        assert!(learned.attached.contains(&"192.0.2.2".parse().unwrap()));
        assert_eq!(learned.relay, relay(Some("192.0.2.2"), None));

        // Dropping the receiver ends the watch.
        drop(addresses);
        let result = ended.recv_timeout(DEADLINE).expect("watch did not end");
        assert!(result.is_ok(), "{result:?}");
    }
}
