//! Frames captured in the lab, parsed and checked independently of the
//! relay's own code: checksums are recomputed from scratch (RFC 1071).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

/// A UDP datagram in an IPv4 frame, with its checksums verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpV4Frame {
    /// Source transport address.
    pub source: SocketAddrV4,
    /// Destination transport address.
    pub destination: SocketAddrV4,
    /// Time to live.
    pub ttl: u8,
    /// The Don't Fragment flag.
    pub dont_fragment: bool,
    /// The UDP checksum field as sent (zero: none).
    pub udp_checksum: u16,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// The RFC 1071 sum of `data`, not yet complemented.
fn ones_complement_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Parses an Ethernet frame; `Ok(None)` if it is not IPv4 UDP. Fails if a
/// checksum is wrong or a length inconsistent.
pub fn parse_udp_v4(frame: &[u8]) -> anyhow::Result<Option<UdpV4Frame>> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return Ok(None);
    }
    let ip = &frame[14..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 17 {
        return Ok(None);
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        total_len <= ip.len() && header_len >= 20,
        "IPv4 length {total_len} exceeds the frame"
    );
    ensure!(
        ones_complement_sum(&ip[..header_len], 0) == 0xffff,
        "bad IPv4 header checksum {:#06x}",
        u16::from_be_bytes([ip[10], ip[11]])
    );
    let source_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let destination_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[header_len..total_len];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    ensure!(
        udp_len == udp.len(),
        "UDP length {udp_len} but {} bytes follow the IP header",
        udp.len()
    );
    let udp_checksum = u16::from_be_bytes([udp[6], udp[7]]);
    if udp_checksum != 0 {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        let sum = ones_complement_sum(udp, ones_complement_sum(&pseudo, 0));
        ensure!(
            sum == 0xffff,
            "bad UDP checksum {udp_checksum:#06x} (sum {sum:#06x})"
        );
    }
    Ok(Some(UdpV4Frame {
        source: SocketAddrV4::new(source_ip, u16::from_be_bytes([udp[0], udp[1]])),
        destination: SocketAddrV4::new(destination_ip, u16::from_be_bytes([udp[2], udp[3]])),
        ttl: ip[8],
        dont_fragment: ip[6] & 0x40 != 0,
        udp_checksum,
        payload: udp[8..].to_vec(),
    }))
}

/// A frame to build: Ethernet, IPv4 or IPv6 (by the addresses' family),
/// UDP, payload; checksums computed from scratch.
#[derive(Debug, Clone)]
pub struct FrameSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source transport address.
    pub source: SocketAddr,
    /// Destination transport address (same family as `source`).
    pub destination: SocketAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 TOS byte or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 identification.
    pub ipv4_id: u16,
    /// IPv4 don't-fragment flag.
    pub ipv4_df: bool,
    /// IPv6 flow label (20 bits).
    pub ipv6_flow: u32,
    /// Whether to compute the UDP checksum (IPv4 may send zero).
    pub udp_checksum: bool,
    /// UDP payload.
    pub payload: Vec<u8>,
}

impl FrameSpec {
    /// A frame carrying what a sender sets and a relay must keep or map
    /// (DSCP/ECN, IPv4 identification, IPv6 flow label), so that the frame
    /// the relay sends can be checked for them.
    pub fn marked(source: SocketAddr, destination: SocketAddr, payload: &[u8]) -> Self {
        let mut spec = Self::new(source, destination, payload);
        spec.tos = 0xb8;
        spec.ipv4_id = 0x4242;
        spec.ipv6_flow = 0x12345;
        spec
    }

    /// The frame a relay sends for this one, from `source` to `destination`
    /// carrying `payload`, to `dst_mac` from `src_mac`: TTL less one,
    /// DSCP/ECN kept; same family keeps the IPv4 identification and DF or
    /// the IPv6 flow label, cross-family uses identification 0 with DF and
    /// flow label 0 (RFC 8656 section 14).
    pub fn relayed(
        &self,
        (source, destination): (SocketAddr, SocketAddr),
        payload: &[u8],
        (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    ) -> Vec<u8> {
        let same_family = self.source.is_ipv4() == source.is_ipv4();
        FrameSpec {
            src_mac,
            dst_mac,
            source,
            destination,
            ttl: self.ttl - 1,
            tos: self.tos,
            ipv4_id: if same_family { self.ipv4_id } else { 0 },
            ipv4_df: if same_family { self.ipv4_df } else { true },
            ipv6_flow: if same_family { self.ipv6_flow } else { 0 },
            udp_checksum: self.udp_checksum,
            payload: payload.to_vec(),
        }
        .build()
    }

    /// A frame with common defaults: TTL 64, TOS 0, DF, checksum on.
    pub fn new(source: SocketAddr, destination: SocketAddr, payload: &[u8]) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            source,
            destination,
            ttl: 64,
            tos: 0,
            ipv4_id: 0x1234,
            ipv4_df: true,
            ipv6_flow: 0,
            udp_checksum: true,
            payload: payload.to_vec(),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.source.port().to_be_bytes());
        udp.extend_from_slice(&self.destination.port().to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (self.source.ip(), self.destination.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&[0x08, 0x00]);
                let mut ip = vec![0x45, self.tos];
                ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
                ip.extend_from_slice(&self.ipv4_id.to_be_bytes());
                ip.extend_from_slice(&[if self.ipv4_df { 0x40 } else { 0 }, 0]);
                ip.extend_from_slice(&[self.ttl, 17, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                let check = !(ones_complement_sum(&ip, 0) as u16);
                ip[10..12].copy_from_slice(&check.to_be_bytes());
                if self.udp_checksum {
                    let mut pseudo = [&src.octets()[..], &dst.octets()[..], &[0, 17]].concat();
                    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
                    set_udp_checksum(&mut udp, &pseudo);
                }
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&[0x86, 0xdd]);
                let word = (6u32 << 28) | (u32::from(self.tos) << 20) | (self.ipv6_flow & 0xfffff);
                frame.extend_from_slice(&word.to_be_bytes());
                frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
                frame.extend_from_slice(&[17, self.ttl]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                let mut pseudo = [&src.octets()[..], &dst.octets()[..]].concat();
                pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                set_udp_checksum(&mut udp, &pseudo);
            }
            _ => panic!("source and destination of different families"),
        }
        frame.extend_from_slice(&udp);
        frame
    }
}

fn set_udp_checksum(udp: &mut [u8], pseudo: &[u8]) {
    let check = match !(ones_complement_sum(udp, ones_complement_sum(pseudo, 0)) as u16) {
        0 => 0xffff,
        check => check,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
}

/// A ChannelData message (RFC 8656 section 12.4), unpadded.
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut message = channel.to_be_bytes().to_vec();
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// A UDP datagram in an IPv6 frame, with its checksum verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpV6Frame {
    /// Source transport address.
    pub source: SocketAddr,
    /// Destination transport address.
    pub destination: SocketAddr,
    /// Hop limit.
    pub hop_limit: u8,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// Parses an Ethernet frame; `Ok(None)` if it is not IPv6 UDP. Fails if the
/// checksum is wrong or a length inconsistent.
pub fn parse_udp_v6(frame: &[u8]) -> anyhow::Result<Option<UdpV6Frame>> {
    if frame.len() < 14 + 40 + 8 || frame[12..14] != [0x86, 0xdd] || frame[14 + 6] != 17 {
        return Ok(None);
    }
    let ip = &frame[14..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    ensure!(
        40 + payload_len <= ip.len(),
        "IPv6 payload length {payload_len} exceeds the frame"
    );
    let src: [u8; 16] = ip[8..24].try_into()?;
    let dst: [u8; 16] = ip[24..40].try_into()?;
    let udp = &ip[40..40 + payload_len];
    ensure!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])) == payload_len,
        "UDP length"
    );
    let mut pseudo = [&src[..], &dst[..]].concat();
    pseudo.extend_from_slice(&(payload_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    ensure!(udp[6..8] != [0, 0], "zero UDP checksum over IPv6");
    let sum = ones_complement_sum(udp, ones_complement_sum(&pseudo, 0));
    ensure!(sum == 0xffff, "bad UDP checksum (sum {sum:#06x})");
    Ok(Some(UdpV6Frame {
        source: SocketAddr::new(IpAddr::from(src), u16::from_be_bytes([udp[0], udp[1]])),
        destination: SocketAddr::new(IpAddr::from(dst), u16::from_be_bytes([udp[2], udp[3]])),
        hop_limit: ip[7],
        payload: udp[8..].to_vec(),
    }))
}

/// A packet socket that sees every frame on one interface (create it inside
/// the interface's namespace).
#[derive(Debug)]
pub struct Capture {
    socket: Socket,
}

impl Capture {
    /// Captures on `interface`.
    pub fn open(interface: &str) -> anyhow::Result<Self> {
        const ETH_P_ALL: u16 = 0x0003;
        let socket = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .context("cannot open a packet socket")?;
        let ifindex = nix::net::if_::if_nametoindex(interface)?;
        use nix::libc;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = ETH_P_ALL.to_be();
        address.sll_ifindex = ifindex as i32;
        // SAFETY: the pointer and length describe `address`, which outlives the call.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const address).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot bind the packet socket");
        }
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self { socket })
    }

    /// The next IPv4 UDP frame for which `matches` holds, within `deadline`.
    pub fn next_udp_v4(
        &self,
        deadline: Duration,
        matches: impl Fn(&UdpV4Frame) -> bool,
    ) -> anyhow::Result<UdpV4Frame> {
        let start = Instant::now();
        let mut buffer = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
        while start.elapsed() < deadline {
            let len = match self.socket.recv(&mut buffer) {
                Ok(len) => len,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("capture failed"),
            };
            // SAFETY: `recv` initialised the first `len` bytes.
            let frame: Vec<u8> = buffer[..len]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if let Some(udp) = parse_udp_v4(&frame)?
                && matches(&udp)
            {
                return Ok(udp);
            }
        }
        bail!("no matching UDP frame captured within {deadline:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with checksums computed by hand-checked arithmetic.
    fn frame(udp_checksum_ok: bool) -> Vec<u8> {
        let payload = b"hi";
        let mut ip = vec![
            0x45, 0, 0, 30, 0, 1, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 2, 198, 51, 100, 2,
        ];
        let ip_check = !(ones_complement_sum(&ip, 0) as u16);
        ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
        let mut udp = vec![0x9c, 0x40, 0x23, 0x28, 0, 10, 0, 0];
        udp.extend_from_slice(payload);
        let mut pseudo = vec![192, 0, 2, 2, 198, 51, 100, 2, 0, 17, 0, 10];
        pseudo.extend_from_slice(&udp);
        let mut check = !(ones_complement_sum(&pseudo, 0) as u16);
        if !udp_checksum_ok {
            check ^= 1;
        }
        udp[6..8].copy_from_slice(&check.to_be_bytes());
        let mut frame = vec![0; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&udp);
        frame
    }

    #[test]
    fn built_frames_parse_with_valid_checksums() {
        let mut spec = FrameSpec::new(
            "192.0.2.2:40000".parse().unwrap(),
            "198.51.100.2:9000".parse().unwrap(),
            b"hi",
        );
        spec.ipv4_id = 1;
        // The hand-made reference frame below has zero MACs.
        assert_eq!(spec.build()[12..], frame(true)[12..]);
        let parsed = parse_udp_v4(&spec.build()).unwrap().unwrap();
        assert_eq!(parsed.payload, b"hi");
        let v6 = FrameSpec::new(
            "[2001:db8:1::2]:40000".parse().unwrap(),
            "[2001:db8:3::2]:9000".parse().unwrap(),
            b"hello",
        );
        let parsed = parse_udp_v6(&v6.build()).unwrap().unwrap();
        assert_eq!(
            (parsed.source, parsed.destination, parsed.hop_limit),
            (v6.source, v6.destination, 64)
        );
        assert_eq!(parsed.payload, b"hello");
        let mut corrupt = v6.build();
        *corrupt.last_mut().unwrap() ^= 1;
        assert!(parse_udp_v6(&corrupt).is_err());
    }

    #[test]
    fn accepts_correct_and_rejects_corrupt_checksums() {
        let parsed = parse_udp_v4(&frame(true)).unwrap().unwrap();
        assert!(parsed.dont_fragment);
        assert_eq!(parsed.source, "192.0.2.2:40000".parse().unwrap());
        assert_eq!(parsed.destination, "198.51.100.2:9000".parse().unwrap());
        assert_eq!(parsed.payload, b"hi");
        assert!(
            parse_udp_v4(&frame(false))
                .unwrap_err()
                .to_string()
                .contains("bad UDP checksum")
        );
        let mut bad_ip = frame(true);
        bad_ip[14 + 8] = 63;
        assert!(
            parse_udp_v4(&bad_ip)
                .unwrap_err()
                .to_string()
                .contains("IPv4 header checksum")
        );
    }
}
