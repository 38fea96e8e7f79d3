//! Following the host's interface addresses through rtnetlink, for both daemons: turn-control
//! refuses them all as peers, xdp-agent picks its relay addresses among them.
//!
//! [`follow`] joins the kernel's IPv4 and IPv6 address groups *before* it asks for a dump of
//! every address, on one socket: the kernel queues dump replies and notifications in the
//! order it produced them, so applying them in order leaves no change unseen between the
//! dump and the subscription. What each daemon keeps of an address is its own
//! ([`AddressTable`]).

use std::future::Future;

use anyhow::Context as _;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::AddressMessage;
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

/// What a daemon keeps of the host's addresses, kept current by RTM_NEWADDR and RTM_DELADDR.
pub trait AddressTable: Default {
    /// Applies RTM_NEWADDR (`present`) or RTM_DELADDR.
    fn apply(&mut self, message: &AddressMessage, present: bool);
}

/// Why [`follow`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nobody listens any more.
    Closed,
    /// The kernel dropped notifications; the table may be stale: follow again.
    Overrun,
}

/// One netlink socket's life: subscribe, dump, then apply notifications to a table of type
/// `T`. `publish` sees the table after the dump is complete and after every datagram of
/// notifications from then on; it returns false when nobody listens any more, and so does
/// `closed` complete. The socket belongs to the network namespace of the thread that first
/// polls the future.
pub async fn follow<T: AddressTable>(
    closed: impl Future<Output = ()>,
    mut publish: impl FnMut(&T) -> bool,
) -> anyhow::Result<Ended> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE).context("cannot open a netlink socket")?;
    let groups = libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(0, groups.unsigned_abs()))
        .context("cannot join the netlink address groups")?;
    let mut table = T::default();
    let mut dump = Dump::request(&socket, 1).await?;
    let mut closed = std::pin::pin!(closed);
    loop {
        let received = tokio::select! {
            () = &mut closed => return Ok(Ended::Closed),
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
            // The table changed while the kernel walked it, so the dump may have skipped an
            // address that did not change (and so sent no notification). Notifications kept
            // everything else current: asking again suffices.
            tracing::debug!("the address dump was interrupted; dumping again");
            dump = Dump::request(&socket, dump.sequence.wrapping_add(1)).await?;
            continue;
        }
        if !publish(&table) {
            return Ok(Ended::Closed);
        }
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
    fn apply<T: AddressTable>(
        &mut self,
        message: NetlinkMessage<RouteNetlinkMessage>,
        table: &mut T,
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
pub fn messages(
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

#[cfg(test)]
mod tests {
    use netlink_packet_route::AddressFamily;
    use netlink_packet_route::address::AddressAttribute;

    use super::*;

    fn message(ifindex: u32, attributes: Vec<AddressAttribute>) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.index = ifindex;
        message.header.prefix_len = 24;
        message.attributes = attributes;
        message
    }

    #[test]
    fn datagrams_split_into_messages() {
        let mut bytes = Vec::new();
        for index in [1, 2] {
            let attributes = vec![AddressAttribute::Local(
                format!("192.0.2.{index}").parse().unwrap(),
            )];
            let payload = RouteNetlinkMessage::NewAddress(message(index, attributes));
            let mut message = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::InnerMessage(payload),
            );
            message.finalize();
            let mut buffer = vec![0; message.buffer_len()];
            message.serialize(&mut buffer);
            bytes.extend_from_slice(&buffer);
        }
        let parsed: Vec<_> = messages(&bytes).collect::<anyhow::Result<_>>().unwrap();
        assert_eq!(parsed.len(), 2);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(second)) =
            &parsed[1].payload
        else {
            panic!("{:?}", parsed[1]);
        };
        assert_eq!(second.header.index, 2);
        // Truncated and garbage input are errors, once, never panics.
        for end in 0..bytes.len() {
            let results: Vec<_> = messages(&bytes[..end]).collect();
            assert!(results.iter().filter(|r| r.is_err()).count() <= 1, "{end}");
        }
        let garbage = [0xffu8; 40];
        assert_eq!(messages(&garbage).count(), 1);
    }
}
