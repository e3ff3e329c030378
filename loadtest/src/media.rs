//! Media sources: what each profile sends, frame by frame, and the RTP packets that carry it.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use webrtc_srtp::context::Context;
use webrtc_srtp::protection_profile::ProtectionProfile;

use crate::scenario::Profile;

/// Largest RTP payload a frame is split into.
pub const MAX_PAYLOAD: usize = 1200;
/// Bytes at the start of every payload that the load test uses itself: send time and index.
pub const STAMP_LEN: usize = 16;
/// Length of the fixed RTP header this load test writes.
pub const RTP_HEADER_LEN: usize = 12;

/// One frame: the payload sizes of the packets that carry it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Payload sizes, each at most [`MAX_PAYLOAD`] and at least [`STAMP_LEN`].
    pub packets: Vec<usize>,
    /// RTP timestamp increment since the previous frame.
    pub ts_step: u32,
    /// A keyframe (video) or full refresh (screen).
    pub key: bool,
}

/// Generates the frames of one participant's media.
#[derive(Debug)]
pub struct Source {
    profile: Profile,
    rng: SmallRng,
    frame: u64,
}

impl Source {
    /// A source for `profile`, with its own random stream.
    pub fn new(profile: Profile, seed: u64) -> Self {
        Self {
            profile,
            rng: SmallRng::seed_from_u64(seed),
            frame: 0,
        }
    }

    /// Time between frames.
    pub fn interval(&self) -> Duration {
        match self.profile {
            Profile::Audio => Duration::from_millis(20),
            Profile::Video => Duration::from_nanos(1_000_000_000 / 30),
            Profile::Screen => Duration::from_millis(200),
        }
    }

    /// RTP payload type.
    pub fn payload_type(&self) -> u8 {
        match self.profile {
            Profile::Audio => 111,
            Profile::Video => 96,
            Profile::Screen => 97,
        }
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> Frame {
        let n = self.frame;
        self.frame += 1;
        match self.profile {
            // Opus at variable bit rate: one 20 ms packet of 60 to 160 bytes.
            Profile::Audio => Frame {
                packets: vec![self.rng.random_range(60..=160)],
                ts_step: 960,
                key: false,
            },
            // About 1 Mbit/s at 30 frames/s, with a keyframe of ~30 kB every 3 s.
            Profile::Video => {
                let key = n.is_multiple_of(90);
                let bytes = if key {
                    self.rng.random_range(25_000..35_000)
                } else {
                    self.rng.random_range(2_500..5_500)
                };
                Frame {
                    packets: split(bytes),
                    ts_step: 3000,
                    key,
                }
            }
            // Small damage updates at 5 frames/s, a full screen every 4 s.
            Profile::Screen => {
                let key = n.is_multiple_of(20);
                let bytes = if key {
                    self.rng.random_range(60_000..90_000)
                } else {
                    self.rng.random_range(500..3_000)
                };
                Frame {
                    packets: split(bytes),
                    ts_step: 18_000,
                    key,
                }
            }
        }
    }
}

/// Splits a frame of `bytes` into payloads of at most [`MAX_PAYLOAD`], evenly.
fn split(bytes: usize) -> Vec<usize> {
    let n = bytes.div_ceil(MAX_PAYLOAD);
    let base = bytes / n;
    let extra = bytes % n;
    (0..n)
        .map(|i| (base + usize::from(i < extra)).max(STAMP_LEN))
        .collect()
}

/// Writes an RTP packet into `out`: header, then a payload of `len` bytes that starts with the
/// send time (nanoseconds since the run's epoch) and the sender's packet index.
#[allow(clippy::too_many_arguments)]
pub fn rtp(
    out: &mut Vec<u8>,
    pt: u8,
    marker: bool,
    seq: u16,
    ts: u32,
    ssrc: u32,
    sent_ns: u64,
    index: u64,
    len: usize,
) {
    out.clear();
    out.push(0x80);
    out.push(pt | if marker { 0x80 } else { 0 });
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.resize(RTP_HEADER_LEN + len.max(STAMP_LEN), 0xA5);
}

/// Largest step between the packets [`prime_srtp`] walks a context through: under half the
/// sequence space, so that each is read as later than the one before.
const PRIME_STEP: u64 = 30_000;

/// Puts `rx`, a context that decrypts `ssrc`'s SRTP, at packet index `index` (rollover counter
/// << 16 | sequence number), as a receiver that joins a stream late learns the sender's rollover
/// counter from signaling (RFC 3711 §3.3.1). Without it, a receiver whose first packet of a
/// stream comes after the sender's sequence number wrapped assumes a rollover counter of 0, and
/// every packet of that stream fails authentication.
///
/// webrtc-srtp keeps the rollover counter to itself, so `rx` is walked there: it decrypts
/// packets that a context with the same keys encrypted for indices 0, 30 000, 60 000, ...,
/// `index`.
pub fn prime_srtp(
    rx: &mut Context,
    key: &[u8],
    salt: &[u8],
    profile: ProtectionProfile,
    ssrc: u32,
    index: u64,
) -> Result<(), webrtc_srtp::Error> {
    let mut tx = Context::new(key, salt, profile, None, None)?;
    let mut buf = Vec::with_capacity(RTP_HEADER_LEN + STAMP_LEN);
    let mut at = 0;
    loop {
        rtp(&mut buf, 0, false, at as u16, 0, ssrc, 0, at, STAMP_LEN);
        rx.decrypt_rtp(&tx.encrypt_rtp(&buf)?)?;
        if at == index {
            return Ok(());
        }
        at = (at + PRIME_STEP).min(index);
    }
}

/// Reads the send time and index back from a decrypted RTP packet.
pub fn stamp(rtp: &[u8]) -> Option<(u64, u64)> {
    let p = rtp.get(RTP_HEADER_LEN..RTP_HEADER_LEN + STAMP_LEN)?;
    Some((
        u64::from_be_bytes(p[..8].try_into().ok()?),
        u64::from_be_bytes(p[8..].try_into().ok()?),
    ))
}

/// Writes an RTCP sender report (RFC 3550 §6.4.1, no report blocks).
pub fn sender_report(
    out: &mut Vec<u8>,
    ssrc: u32,
    ntp: u64,
    rtp_ts: u32,
    packets: u32,
    octets: u32,
) {
    out.clear();
    out.push(0x80);
    out.push(200);
    out.extend_from_slice(&6u16.to_be_bytes());
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.extend_from_slice(&ntp.to_be_bytes());
    out.extend_from_slice(&rtp_ts.to_be_bytes());
    out.extend_from_slice(&packets.to_be_bytes());
    out.extend_from_slice(&octets.to_be_bytes());
}

/// True for an RTCP packet (payload types 192 to 223 in the second byte; RFC 5761).
pub fn is_rtcp(pkt: &[u8]) -> bool {
    pkt.len() >= 2 && (192..=223).contains(&pkt[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender whose sequence number wrapped before a receiver's first packet: only a primed
    /// receiver authenticates its packets (the fault that failed the 5-minute soak's joiners).
    #[test]
    fn a_late_receiver_primed_with_the_index_authenticates_after_a_wrap() {
        let (key, salt) = ([7u8; 16], [9u8; 14]);
        for profile in [
            ProtectionProfile::Aes128CmHmacSha1_80,
            ProtectionProfile::AeadAes128Gcm,
        ] {
            let (ks, ss) = (&key[..profile.key_len()], &salt[..profile.salt_len()]);
            let mut tx = Context::new(ks, ss, profile, None, None).unwrap();
            let mut buf = Vec::new();
            // Two wraps and a bit: index 2 << 16 | 65 000 + 3 000.
            let start = 65_000u64;
            let mut packets = Vec::new();
            for index in start..start + 2 * 65_536 + 3_000 {
                rtp(&mut buf, 111, false, index as u16, 0, 42, 0, index, 100);
                let p = tx.encrypt_rtp(&buf).unwrap();
                if index >= start + 2 * 65_536 + 2_990 {
                    packets.push((index, p));
                }
            }
            let first = packets[0].0;
            let mut fresh = Context::new(ks, ss, profile, None, None).unwrap();
            assert!(fresh.decrypt_rtp(&packets[0].1).is_err(), "{profile:?}");
            let mut primed = Context::new(ks, ss, profile, None, None).unwrap();
            prime_srtp(&mut primed, ks, ss, profile, 42, first).unwrap();
            // In order, and one late one.
            for (index, p) in packets.iter().skip(1).chain(&packets[..1]) {
                let plain = primed.decrypt_rtp(p).expect("authenticates");
                assert_eq!(stamp(&plain).unwrap().1, *index);
            }
        }
    }

    #[test]
    fn audio_is_one_small_packet_every_20_ms() {
        let mut s = Source::new(Profile::Audio, 1);
        assert_eq!(s.interval(), Duration::from_millis(20));
        for _ in 0..1000 {
            let f = s.next_frame();
            assert_eq!(f.packets.len(), 1);
            assert!((60..=160).contains(&f.packets[0]));
        }
    }

    #[test]
    fn video_is_about_a_megabit_with_keyframe_bursts() {
        let mut s = Source::new(Profile::Video, 2);
        let mut bytes = 0;
        let mut keys = 0;
        for _ in 0..30 * 30 {
            let f = s.next_frame();
            assert!(
                f.packets
                    .iter()
                    .all(|&p| (STAMP_LEN..=MAX_PAYLOAD).contains(&p))
            );
            if f.key {
                keys += 1;
                assert!(f.packets.len() >= 21, "a keyframe is a burst");
            }
            bytes += f.packets.iter().sum::<usize>();
        }
        let mbps = bytes as f64 * 8.0 / 30.0 / 1e6;
        assert!((0.9..1.6).contains(&mbps), "{mbps}");
        assert_eq!(keys, 10);
    }

    #[test]
    fn rtp_stamp_round_trips() {
        let mut buf = Vec::new();
        rtp(&mut buf, 111, true, 7, 960, 42, 123_456, 9, 100);
        assert_eq!(buf.len(), 112);
        assert_eq!(buf[1], 111 | 0x80);
        assert_eq!(stamp(&buf), Some((123_456, 9)));
        assert!(!is_rtcp(&buf));
        sender_report(&mut buf, 42, 1, 2, 3, 4);
        assert_eq!(buf.len(), 28);
        assert!(is_rtcp(&buf));
    }
}
