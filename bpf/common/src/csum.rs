//! Incremental Internet checksum updates (RFC 1624).
//!
//! Words are summed in the machine's byte order, not the wire's: the
//! one's-complement sum is independent of byte order (RFC 1071 section 2(B)),
//! so loading a wire word as it lies in memory and storing the result the same
//! way gives the same checksum bytes without a byte swap per word.

/// An Internet checksum being updated word by word, per RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`, summed in 32 bits and folded once at the end.
#[derive(Clone, Copy, Debug)]
pub struct Incremental {
    sum: u32,
}

impl Incremental {
    /// Starts from the checksum currently in a header (big-endian).
    #[inline(always)]
    pub fn new(check: [u8; 2]) -> Self {
        Self {
            sum: u32::from(!u16::from_ne_bytes(check)),
        }
    }

    /// A 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn replace16(&mut self, old: [u8; 2], new: [u8; 2]) {
        self.sum += u32::from(!u16::from_ne_bytes(old)) + u32::from(u16::from_ne_bytes(new));
    }

    /// A 32-bit field (two words) changed from `old` to `new`.
    #[inline(always)]
    pub fn replace32(&mut self, old: [u8; 4], new: [u8; 4]) {
        self.replace16([old[0], old[1]], [new[0], new[1]]);
        self.replace16([old[2], old[3]], [new[2], new[3]]);
    }

    /// A 16-bit word left the checksummed data.
    #[inline(always)]
    pub fn remove16(&mut self, old: [u8; 2]) {
        self.sum += u32::from(!u16::from_ne_bytes(old));
    }

    /// A 16-bit word joined the checksummed data.
    #[inline(always)]
    pub fn add16(&mut self, new: [u8; 2]) {
        self.sum += u32::from(u16::from_ne_bytes(new));
    }

    /// The updated checksum, as its bytes lie on the wire.
    #[inline(always)]
    pub fn finish(self) -> [u8; 2] {
        (!fold(self.sum)).to_ne_bytes()
    }

    /// The updated UDP checksum: a computed zero is sent as all ones, since
    /// zero means "no checksum" (RFC 768).
    #[inline(always)]
    pub fn finish_udp(self) -> [u8; 2] {
        match self.finish() {
            [0, 0] => [0xff, 0xff],
            check => check,
        }
    }
}

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: the full Internet checksum (RFC 1071) of `data`.
    fn full(data: &[u8]) -> [u8; 2] {
        let mut sum = 0u32;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        (!fold(sum)).to_be_bytes()
    }

    #[test]
    fn replacing_words_matches_recomputation() {
        let mut data = [
            0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 1, 203, 0, 113, 9,
        ];
        let check = full(&data);
        let mut update = Incremental::new(check);
        update.replace32([192, 0, 2, 1], [198, 51, 100, 200]);
        update.replace16([0, 60], [0, 56]);
        data[12..16].copy_from_slice(&[198, 51, 100, 200]);
        data[2..4].copy_from_slice(&[0, 56]);
        assert_eq!(update.finish(), full(&data));
    }

    #[test]
    fn removing_words_matches_recomputation() {
        let data = [0x40u8, 0x01, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef];
        let mut update = Incremental::new(full(&data));
        update.remove16([0x40, 0x01]);
        update.remove16([0x00, 0x04]);
        assert_eq!(update.finish(), full(&data[4..]));
    }

    #[test]
    fn udp_zero_is_sent_as_all_ones() {
        // A sum whose complement is zero: the data sums to 0xffff.
        let mut update = Incremental::new(full(&[0xff, 0xfe]));
        update.replace16([0xff, 0xfe], [0xff, 0xff]);
        assert_eq!(update.finish(), [0, 0]);
        assert_eq!(update.finish_udp(), [0xff, 0xff]);
    }
}
