//! The benchmark's datagrams: RTP-shaped (so the relay classifies them as SRTP and forwards
//! them), carrying a sequence number and the sender's clock.
//!
//! | offset | size | field                                               |
//! |-------:|-----:|-----------------------------------------------------|
//! | 0      | 1    | 0x80 (RTP version 2)                                |
//! | 1      | 1    | payload type 96                                     |
//! | 2      | 2    | low 16 bits of the sequence number                  |
//! | 4      | 4    | RTP timestamp (unused)                              |
//! | 8      | 4    | SSRC: the flow index                                |
//! | 12     | 8    | sequence number, unique across the run's flows      |
//! | 20     | 8    | send time, Unix nanoseconds                         |
//! | 28     | ...  | zero padding to the packet size                     |

/// Smallest packet that holds the fields above.
pub const MIN_LEN: usize = 28;

/// Writes a packet's fixed header into `buf` (at least [`MIN_LEN`] bytes).
pub fn init(buf: &mut [u8], flow: u32) {
    buf.fill(0);
    buf[0] = 0x80;
    buf[1] = 96;
    buf[8..12].copy_from_slice(&flow.to_be_bytes());
}

/// Stamps sequence number `seq` and send time `sent_ns` into a packet made by [`init`].
#[inline]
pub fn stamp(buf: &mut [u8], seq: u64, sent_ns: u64) {
    buf[2..4].copy_from_slice(&(seq as u16).to_be_bytes());
    buf[12..20].copy_from_slice(&seq.to_be_bytes());
    buf[20..28].copy_from_slice(&sent_ns.to_be_bytes());
}

/// The sequence number and send time of a received packet; `None` if it is not one of ours
/// (a relay's control message, say).
#[inline]
pub fn read(buf: &[u8]) -> Option<(u64, u64)> {
    if buf.len() < MIN_LEN || buf[0] != 0x80 || buf[1] != 96 {
        return None;
    }
    let seq = u64::from_be_bytes(buf[12..20].try_into().ok()?);
    let sent = u64::from_be_bytes(buf[20..28].try_into().ok()?);
    Some((seq, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut b = vec![0u8; 200];
        init(&mut b, 3);
        stamp(&mut b, 70_000, 42);
        assert_eq!(read(&b), Some((70_000, 42)));
        assert_eq!(
            veil_relay_core::wire::classify(&b),
            veil_relay_core::wire::Class::Rtp
        );
        assert_eq!(read(&b[..20]), None);
        assert_eq!(read(&[0x54; 40]), None);
    }
}
