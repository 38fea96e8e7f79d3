//! Telling STUN from ChannelData, splitting TCP streams, and the ChannelData codec
//! (RFC 8656 §12.4-§12.5).
//!
//! The first two bits of a frame tell them apart: `00` is STUN (RFC 8489 §5), `01` is
//! ChannelData (channel numbers `0x4000..=0x7FFF`, see [`ChannelNumber`]).

use crate::types::{ChannelNumber, Transport};

/// Length of the STUN message header (RFC 8489 §5).
pub const STUN_HEADER_LEN: usize = 20;
/// Length of the ChannelData header: channel number and length (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// The STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Why bytes cannot be framed or parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bits are neither `00` (STUN) nor `01` (ChannelData).
    #[error("first byte {0:#04x} starts neither a STUN nor a ChannelData message")]
    UnknownFrame(u8),
    /// A STUN length that is not a multiple of four (RFC 8489 §5).
    #[error("STUN message length {0} is not a multiple of 4")]
    UnalignedStunLength(u16),
    /// Fewer bytes than a ChannelData header.
    #[error("ChannelData shorter than its 4-byte header")]
    Truncated,
    /// The channel number is outside `0x4000..=0x7FFF`.
    #[error("invalid channel number {0:#06x}")]
    InvalidChannel(u16),
    /// The length field claims more bytes than the frame holds.
    #[error("ChannelData length {declared} exceeds the {available} bytes present")]
    LengthExceedsFrame {
        /// The length field.
        declared: usize,
        /// The bytes after the header.
        available: usize,
    },
}

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A STUN message.
    Stun,
    /// A ChannelData message.
    ChannelData,
}

/// Classifies a frame by its first byte (RFC 8656 §12.4 demultiplexing).
pub fn frame_kind(first_byte: u8) -> Result<FrameKind, FrameError> {
    match first_byte >> 6 {
        0b00 => Ok(FrameKind::Stun),
        0b01 => Ok(FrameKind::ChannelData),
        _ => Err(FrameError::UnknownFrame(first_byte)),
    }
}

/// How long the next frame at the start of a TCP stream buffer is.
///
/// Returns `Ok(None)` when fewer than four bytes are buffered, `Ok(Some(n))` with the full
/// length of the next STUN message or ChannelData message including its padding to four
/// bytes (RFC 8656 §12.5: over TCP, ChannelData is always padded), and an error when the
/// stream is not TURN; the daemon should then close the connection. `n` may exceed
/// `buf.len()`: read more before handing the frame to the server.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let [b0, b1, b2, b3, ..] = *buf else {
        return Ok(None);
    };
    let length = u16::from_be_bytes([b2, b3]);
    match frame_kind(b0)? {
        FrameKind::Stun => {
            if length % 4 != 0 {
                return Err(FrameError::UnalignedStunLength(length));
            }
            Ok(Some(STUN_HEADER_LEN + usize::from(length)))
        }
        FrameKind::ChannelData => {
            let number = u16::from_be_bytes([b0, b1]);
            if ChannelNumber::new(number).is_err() {
                return Err(FrameError::InvalidChannel(number));
            }
            Ok(Some(CHANNEL_DATA_HEADER_LEN + padded(usize::from(length))))
        }
    }
}

/// `len` rounded up to a multiple of four.
pub(crate) fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// A parsed ChannelData message borrowing its payload from the input (RFC 8656 §12.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel the data belongs to.
    pub channel: ChannelNumber,
    /// The application data.
    pub payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message. Bytes after the declared length are padding (always on
    /// TCP, optional on UDP, RFC 8656 §12.5) and are ignored.
    pub fn parse(buf: &'a [u8]) -> Result<Self, FrameError> {
        let [b0, b1, b2, b3, ref rest @ ..] = *buf else {
            return Err(FrameError::Truncated);
        };
        let number = u16::from_be_bytes([b0, b1]);
        let channel = ChannelNumber::new(number).map_err(|_| FrameError::InvalidChannel(number))?;
        let declared = usize::from(u16::from_be_bytes([b2, b3]));
        let payload = rest.get(..declared).ok_or(FrameError::LengthExceedsFrame {
            declared,
            available: rest.len(),
        })?;
        Ok(Self { channel, payload })
    }

    /// Encodes into a new buffer, padded to four bytes when `transport` is TCP
    /// (RFC 8656 §12.5). Payloads longer than 65535 bytes are cut there; nothing that large
    /// fits a UDP datagram anyway.
    pub fn encode(&self, transport: Transport) -> Vec<u8> {
        let payload = &self.payload[..self.payload.len().min(usize::from(u16::MAX))];
        let len = CHANNEL_DATA_HEADER_LEN + payload.len();
        let total = match transport {
            Transport::Udp => len,
            Transport::Tcp => padded(len),
        };
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&self.channel.value().to_be_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out.resize(total, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ch(n: u16) -> ChannelNumber {
        ChannelNumber::new(n).unwrap()
    }

    #[test]
    fn frame_len_of_stun_and_channel_data() {
        assert_eq!(frame_len(&[0x00, 0x01, 0x00]), Ok(None));
        assert_eq!(frame_len(&[0x00, 0x01, 0x00, 0x08]), Ok(Some(28)));
        assert_eq!(
            frame_len(&[0x00, 0x01, 0x00, 0x07]),
            Err(FrameError::UnalignedStunLength(7))
        );
        // ChannelData of 5 bytes takes 4 + 8 on TCP.
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05]), Ok(Some(12)));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x04]), Ok(Some(8)));
        // RFC 5766's upper channel range frames like the rest.
        assert_eq!(frame_len(&[0x7f, 0xff, 0x00, 0x04]), Ok(Some(8)));
        assert_eq!(
            frame_len(&[0x80, 0, 0, 0]),
            Err(FrameError::UnknownFrame(0x80))
        );
    }

    #[test]
    fn tcp_encoding_is_padded_udp_is_not() {
        let data = ChannelData {
            channel: ch(0x4001),
            payload: b"hello",
        };
        let udp = data.encode(Transport::Udp);
        assert_eq!(udp, b"\x40\x01\x00\x05hello");
        let tcp = data.encode(Transport::Tcp);
        assert_eq!(tcp, b"\x40\x01\x00\x05hello\0\0\0");
        assert_eq!(frame_len(&tcp), Ok(Some(tcp.len())));
        assert_eq!(ChannelData::parse(&tcp), Ok(data));
    }

    #[test]
    fn parse_rejects_bad_frames() {
        assert_eq!(
            ChannelData::parse(&[0x40, 0x00, 0x00]),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            ChannelData::parse(&[0x40, 0x00, 0x00, 0x02, 1]),
            Err(FrameError::LengthExceedsFrame {
                declared: 2,
                available: 1
            })
        );
        assert_eq!(
            ChannelData::parse(&[0x3F, 0xFF, 0x00, 0x00]),
            Err(FrameError::InvalidChannel(0x3FFF))
        );
    }

    proptest! {
        #[test]
        fn channel_data_round_trips(
            n in 0x4000u16..=0x7FFF,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            tcp in any::<bool>(),
        ) {
            let transport = if tcp { Transport::Tcp } else { Transport::Udp };
            let data = ChannelData { channel: ch(n), payload: &payload };
            let wire = data.encode(transport);
            prop_assert_eq!(ChannelData::parse(&wire), Ok(data));
            if tcp {
                prop_assert_eq!(wire.len() % 4, 0);
                prop_assert_eq!(frame_len(&wire), Ok(Some(wire.len())));
            }
        }

        #[test]
        fn framing_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = frame_len(&buf);
            let _ = ChannelData::parse(&buf);
        }
    }
}
