//! TCP framing (RFC 8656 §12.5): `frame_len` on arbitrary streams, and valid frames
//! concatenated, delivered in arbitrary chunks and split again.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use turn_control_core::{ChannelData, ChannelNumber, Transport, frame_len};

#[derive(Debug, Arbitrary)]
enum Frame {
    Stun { type_bits: u16, body: Vec<u8> },
    ChannelData { channel: u16, payload: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Bytes taken as a stream as they are.
    raw: Vec<u8>,
    /// Valid frames to concatenate.
    frames: Vec<Frame>,
    /// Sizes of the reads the concatenation arrives in.
    chunks: Vec<u16>,
}

/// Checks one `frame_len` answer against the header it read.
fn check_claim(buf: &[u8]) -> Option<usize> {
    let result = frame_len(buf);
    let [b0, b1, b2, b3, ..] = *buf else {
        assert_eq!(result, Ok(None), "fewer than 4 bytes must ask for more");
        return None;
    };
    let length = usize::from(u16::from_be_bytes([b2, b3]));
    match (b0 >> 6, result) {
        (0, Ok(Some(n))) => {
            assert_eq!(length % 4, 0);
            assert_eq!(n, 20 + length);
            Some(n)
        }
        (1, Ok(Some(n))) => {
            assert!(ChannelNumber::new(u16::from_be_bytes([b0, b1])).is_ok());
            assert_eq!(n, 4 + length.next_multiple_of(4));
            if let Some(frame) = buf.get(..n) {
                let data = ChannelData::parse(frame).expect("a complete frame parses");
                assert_eq!(data.payload.len(), length);
            }
            Some(n)
        }
        (0, Err(_)) => {
            assert_ne!(length % 4, 0, "an aligned STUN length is accepted");
            None
        }
        (1, Err(_)) => {
            assert!(ChannelNumber::new(u16::from_be_bytes([b0, b1])).is_err());
            None
        }
        (_, Err(_)) => None,
        (kind, other) => panic!("first bits {kind:#b} gave {other:?}"),
    }
}

fuzz_target!(|input: Input| {
    // 1. An arbitrary stream: every claim matches its header and never exceeds what the
    //    header says; walking stops at the first error or incomplete frame.
    let mut rest = &input.raw[..];
    while let Some(n) = check_claim(rest) {
        assert!(n >= 4);
        let Some(tail) = rest.get(n..) else { break };
        rest = tail;
    }

    // 2. Valid frames, concatenated and delivered in chunks, come out as they went in.
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for frame in &input.frames {
        let bytes = match frame {
            Frame::Stun { type_bits, body } => {
                let mut body = body.clone();
                body.truncate(0xFFFC);
                body.resize(body.len().next_multiple_of(4), 0);
                let mut m = (type_bits & 0x3FFF).to_be_bytes().to_vec();
                m.extend_from_slice(&(body.len() as u16).to_be_bytes());
                m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
                m.extend_from_slice(&[0; 12]);
                m.extend_from_slice(&body);
                m
            }
            Frame::ChannelData { channel, payload } => {
                let channel = ChannelNumber::new(0x4000 | (channel & 0x3FFF))
                    .expect("0x4000..=0x7FFF is valid");
                ChannelData { channel, payload }.encode(Transport::Tcp)
            }
        };
        wire.extend_from_slice(&bytes);
        expected.push(bytes);
    }
    let mut buffer = Vec::new();
    let mut got = Vec::new();
    let mut offset = 0;
    let mut chunks = input.chunks.iter().map(|&c| usize::from(c).max(1)).cycle();
    while offset < wire.len() {
        let take = chunks.next().unwrap_or(usize::MAX).min(wire.len() - offset);
        buffer.extend_from_slice(&wire[offset..offset + take]);
        offset += take;
        // The daemon's loop: take whole frames off the front, keep the rest.
        while let Ok(Some(n)) = frame_len(&buffer)
            && n <= buffer.len()
        {
            got.push(buffer.drain(..n).collect::<Vec<_>>());
        }
        assert!(
            frame_len(&buffer).is_ok(),
            "valid frames never fail to frame"
        );
    }
    assert!(buffer.is_empty(), "bytes left over: {buffer:?}");
    assert_eq!(got, expected);
});
