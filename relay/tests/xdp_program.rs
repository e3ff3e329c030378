//! The kernel fast path's program, run in the kernel on synthetic frames (`BPF_PROG_TEST_RUN`):
//! what it forwards and how it rewrites it, and everything it must hand to userspace or drop.
//!
//! Needs the `xdp` feature and root (CAP_BPF, CAP_NET_ADMIN): `cargo test -p veil-relay
//! --features xdp --test xdp_program`. Without root the tests say so and pass, except under
//! `CI=true`, where a skip is a failure.
#![cfg(feature = "xdp")]

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions};
use veil_relay::xdp::{LegKey, LegValue, Program, Stat};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TTL: u8 = 61;

const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), 40000);
const A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 2), 5002);
const B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 3), 5003);
const MAC_RELAY: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 3];

fn root() -> bool {
    // /proc/self belongs to the process's effective user.
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the XDP program tests need root, and CI=true: a skip is a failure"
    );
    eprintln!("skipped: the XDP program tests need root");
    false
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    let c = !fold(sum16(&pseudo) + sum16(udp));
    if c == 0 { 0xffff } else { c }
}

/// A frame from `src` (MAC `smac`) to `dst` at the relay's MAC, with the sender's own IP header
/// fields (TTL 55, ID 0x1234, TOS 0xb8, DF clear), as a foreign stack would write them.
fn frame(smac: [u8; 6], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_RELAY);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0xb8];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 55, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let c = !fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = udp_checksum(*src.ip(), *dst.ip(), &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// An SRTP-shaped payload: RTP version 2, `len` bytes.
fn rtp(len: usize) -> Vec<u8> {
    let mut p = vec![0x80, 0x60];
    p.extend((0..len - 2).map(|i| i as u8));
    p
}

/// Runs the program on `frame`, arriving on the loopback device (ifindex 1): its verdict and
/// the frame as it left.
fn run(p: &Program, frame: &[u8]) -> (u32, Vec<u8>) {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, 1, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = p.fast_path().test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The program with A and B of one session installed, as the relay installs them.
fn installed(limits: (u32, u64), expires_ns: u64) -> Program {
    let mut p = Program::load(TTL).expect("load the XDP program");
    let entry = |out: SocketAddrV4| LegValue {
        out: LegKey::new(RELAY, out),
        max_pps: limits.0,
        max_bps: limits.1,
        expires_ns,
        pkt_credit: u64::from(limits.0) * 1_000_000,
        bit_credit: limits.1 * 1000,
        ip_id: 0x5000,
        ..LegValue::default()
    };
    p.insert(LegKey::new(A, RELAY), &entry(B)).unwrap();
    p.insert(LegKey::new(B, RELAY), &entry(A)).unwrap();
    p
}

const FOREVER: u64 = u64::MAX;

/// B has sent once (the relay learned where B is); then A's media is forwarded to B.
fn learned(limits: (u32, u64)) -> Program {
    let p = installed(limits, FOREVER);
    let (v, _) = run(&p, &frame(MAC_B, B, RELAY, &rtp(100)));
    assert_eq!(
        v, XDP_PASS,
        "B's first datagram: A's next hop is not known yet"
    );
    assert_eq!(p.stat(Stat::PassPeerUnknown), 1);
    p
}

#[test]
fn a_bound_legs_media_leaves_from_the_relay_with_the_relays_own_header() {
    if !root() {
        return;
    }
    let p = learned((0, 0));
    let payload = rtp(172);
    let (v, out) = run(&p, &frame(MAC_A, A, RELAY, &payload));
    assert_eq!(v, XDP_TX);
    // Ethernet: to B's next hop, from the relay's MAC.
    assert_eq!(&out[0..6], &MAC_B);
    assert_eq!(&out[6..12], &MAC_RELAY);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(
        ip[1], 0,
        "TOS: the relay's socket writes 0, not the sender's 0xb8"
    );
    assert_eq!(
        u16::from_be_bytes([ip[4], ip[5]]),
        0x5000,
        "IP ID: the leg's own counter, not the sender's 0x1234"
    );
    assert_eq!(&ip[6..8], &[0x40, 0], "DF set, no fragment offset");
    assert_eq!(ip[8], TTL, "TTL: the relay's, not the sender's 55");
    assert_eq!(&ip[12..16], &RELAY.ip().octets(), "from the relay");
    assert_eq!(&ip[16..20], &B.ip().octets(), "to B");
    assert_eq!(fold(sum16(ip)), 0xffff, "IPv4 header checksum valid");
    let udp = &out[34..];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), RELAY.port());
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), B.port());
    let mut zeroed = udp.to_vec();
    zeroed[6..8].copy_from_slice(&[0, 0]);
    assert_eq!(
        u16::from_be_bytes([udp[6], udp[7]]),
        udp_checksum(*RELAY.ip(), *B.ip(), &zeroed),
        "UDP checksum valid for the new addresses and ports"
    );
    assert_eq!(&udp[8..], &payload[..], "the payload is not touched");
    assert_eq!(p.stat(Stat::ForwardedPackets), 1);
    assert_eq!(p.stat(Stat::ForwardedBytes), payload.len() as u64);
    let a = p.get(LegKey::new(A, RELAY)).unwrap();
    assert_eq!((a.rx_packets, a.fwd_packets, a.fwd_bytes), (1, 1, 172));
    assert_eq!(a.peer_mac, MAC_A);
    assert_eq!(a.ifindex, 1);
    let (_, next) = run(&p, &frame(MAC_A, A, RELAY, &payload));
    assert_eq!(
        u16::from_be_bytes([next[18], next[19]]),
        0x5001,
        "the next datagram's ID: one up"
    );
    // And back: B to A.
    let (v, out) = run(&p, &frame(MAC_B, B, RELAY, &rtp(60)));
    assert_eq!(v, XDP_TX);
    assert_eq!(&out[0..6], &MAC_A);
    assert_eq!(&out[30..34], &A.ip().octets());
}

#[test]
fn dtls_is_forwarded_and_everything_else_goes_to_userspace_unchanged() {
    if !root() {
        return;
    }
    let p = learned((0, 0));
    // DTLS (RFC 7983: 20-63), at least a record header.
    let mut dtls = vec![22u8, 0xfe, 0xfd];
    dtls.resize(40, 0);
    assert_eq!(run(&p, &frame(MAC_A, A, RELAY, &dtls)).0, XDP_TX);

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        // Veil's own control messages (KEEPALIVE, BIND...) are userspace's to answer.
        (
            "a KEEPALIVE",
            veil_relay_core::wire::keepalive([7; 8]).to_vec(),
        ),
        ("STUN (TURN)", {
            let mut m = vec![0x00u8, 0x01];
            m.resize(20, 0);
            m
        }),
        ("RTP shorter than its header", rtp(11)),
        ("DTLS shorter than a record header", vec![22u8; 12]),
        ("a payload over 1500 bytes", rtp(1501)),
    ];
    // The relay's own port, from a source no leg holds.
    let stranger = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 9), 5009);
    for (what, payload) in cases.drain(..) {
        let f = frame(MAC_A, A, RELAY, &payload);
        let (v, out) = run(&p, &f);
        assert_eq!(v, XDP_PASS, "{what}: to userspace");
        assert_eq!(out, f, "{what}: unchanged");
    }
    let f = frame(MAC_A, stranger, RELAY, &rtp(100));
    assert_eq!(
        run(&p, &f),
        (XDP_PASS, f),
        "an unknown source: to userspace, unchanged"
    );
    // A fragment, IP options, a datagram without a UDP checksum: userspace's.
    let mut frag = frame(MAC_A, A, RELAY, &rtp(100));
    frag[20] = 0x20; // MF
    assert_eq!(run(&p, &frag).0, XDP_PASS, "a fragment");
    let mut nocsum = frame(MAC_A, A, RELAY, &rtp(100));
    nocsum[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(run(&p, &nocsum).0, XDP_PASS, "no UDP checksum");
    let mut opts = frame(MAC_A, A, RELAY, &rtp(100));
    opts[14] = 0x46;
    assert_eq!(run(&p, &opts).0, XDP_PASS, "IP options");
    let mut lying = frame(MAC_A, A, RELAY, &rtp(100));
    lying[38..40].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(
        run(&p, &lying).0,
        XDP_PASS,
        "a UDP length that is not the datagram's"
    );
    assert_eq!(p.stat(Stat::ForwardedPackets), 1, "only the DTLS record");
    assert!(p.stat(Stat::PassNotMedia) >= 6);
}

#[test]
fn a_leg_past_its_expiry_goes_to_userspace() {
    if !root() {
        return;
    }
    let p = installed((0, 0), 1);
    let f = frame(MAC_A, A, RELAY, &rtp(100));
    assert_eq!(run(&p, &f), (XDP_PASS, f));
    assert_eq!(p.stat(Stat::PassExpired), 1);
    assert_eq!(p.stat(Stat::ForwardedPackets), 0);
}

#[test]
fn the_tickets_rate_limits_hold_on_the_fast_path() {
    if !root() {
        return;
    }
    // 5 packets per second: a burst of one second's worth, then nothing until it refills.
    let p = learned((5, 0));
    let verdicts: Vec<u32> = (0..12)
        .map(|_| run(&p, &frame(MAC_A, A, RELAY, &rtp(100))).0)
        .collect();
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_TX).count(),
        5,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_DROP).count(),
        7,
        "{verdicts:?}"
    );
    assert_eq!(p.stat(Stat::RateLimited), 7);
    assert_eq!(p.get(LegKey::new(A, RELAY)).unwrap().limited_packets, 7);
    // After 250 ms, one more (5/s refills one every 200 ms).
    std::thread::sleep(std::time::Duration::from_millis(250));
    assert_eq!(run(&p, &frame(MAC_A, A, RELAY, &rtp(100))).0, XDP_TX);

    // 8000 bit/s: 1000 bytes a second; 200-byte datagrams: 5, then drops.
    let p = learned((0, 8000));
    let sent = (0..10)
        .filter(|_| run(&p, &frame(MAC_A, A, RELAY, &rtp(200))).0 == XDP_TX)
        .count();
    assert_eq!(sent, 5);
}

#[test]
fn a_removed_leg_is_forwarded_no_more() {
    if !root() {
        return;
    }
    let mut p = learned((0, 0));
    assert_eq!(run(&p, &frame(MAC_A, A, RELAY, &rtp(100))).0, XDP_TX);
    p.remove(LegKey::new(B, RELAY));
    // A's entry alone: B's next hop is gone with B's entry, so nothing is sent to B.
    let f = frame(MAC_A, A, RELAY, &rtp(100));
    assert_eq!(run(&p, &f), (XDP_PASS, f));
    p.remove(LegKey::new(A, RELAY));
    assert!(p.is_empty());
    let f = frame(MAC_A, A, RELAY, &rtp(100));
    assert_eq!(run(&p, &f), (XDP_PASS, f));
}

#[test]
fn a_participant_that_only_receives_is_reached_once_it_sent_a_keepalive() {
    if !root() {
        return;
    }
    let p = installed((0, 0), FOREVER);
    let media = frame(MAC_A, A, RELAY, &rtp(100));
    assert_eq!(run(&p, &media).0, XDP_PASS, "B's next hop not known yet");
    // B sends no media, only Veil KEEPALIVEs (handed to userspace, which answers them).
    let k = frame(MAC_B, B, RELAY, &veil_relay_core::wire::keepalive([7; 8]));
    assert_eq!(run(&p, &k), (XDP_PASS, k));
    let (v, out) = run(&p, &media);
    assert_eq!(v, XDP_TX);
    assert_eq!(&out[0..6], &MAC_B);
}
