//! Writes the seed corpus of every fuzz target to `fuzz/corpus/<target>/seed-*`.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --features controller --example gen_corpus
//! ```
//!
//! Run it again after changing a wire format or the `datagram` scenario's input encoding, and
//! commit the result. It only (over)writes `seed-*` files: inputs the fuzzer found and that were
//! merged into the corpus by hand stay.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use veil_fuzz::datagram::{self, Op};
use veil_proto::v1 as pb;
use veil_relay_core::DropReason;
use veil_relay_core::cookie::Cookies;
use veil_relay_core::token::{KeyId, KeyRing, Limits, SessionId, Ticket};
use veil_relay_core::wire::{self, ErrorCode};

struct Corpus {
    root: PathBuf,
    written: usize,
}

impl Corpus {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("create corpus directory");
        fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        self.written += 1;
    }
}

fn ticket(session: u64, leg: u8, legs: u8, limits: Limits) -> Ticket {
    Ticket {
        key_id: KeyId(0),
        session: SessionId(session),
        leg,
        legs,
        expires_unix_ms: datagram::T0_UNIX_MS + 3_600_000,
        limits,
    }
}

fn rtp(len: usize, pt: u8) -> Vec<u8> {
    // Version 2, payload type, sequence 1, timestamp 0, SSRC 0xdeadbeef: cut to `len`.
    let mut p = vec![0x80, pt, 0, 1, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    p.resize(len, 0);
    p
}

fn dtls_client_hello() -> Vec<u8> {
    // Record header: handshake (22), DTLS 1.2 (0xfefd), epoch 0, sequence 0, length.
    let mut p = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40];
    p.extend_from_slice(&[1; 40]);
    p
}

fn stun_binding_request() -> Vec<u8> {
    let mut p = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    p.extend_from_slice(&[7; 12]);
    p
}

fn wire_seeds(c: &mut Corpus) {
    let ring = veil_fuzz::key_ring();
    let token = ring.mint(ticket(7, 0, 2, Limits::default()));
    let cookie = [0xc0; wire::COOKIE_LEN];
    let t = "wire";
    c.put(t, "bind", &wire::bind(&token, [1; 8], None));
    c.put(t, "bind-cookie", &wire::bind(&token, [2; 8], Some(&cookie)));
    c.put(t, "keepalive", &wire::keepalive([3; 8]));
    c.put(t, "challenge", wire::challenge([1; 8], &cookie).as_bytes());
    c.put(t, "bind-ok", wire::bind_ok([2; 8], 30).as_bytes());
    c.put(t, "keepalive-ack", wire::keepalive_ack([3; 8]).as_bytes());
    for code in [
        ErrorCode::SessionClosed,
        ErrorCode::Expired,
        ErrorCode::Draining,
    ] {
        c.put(
            t,
            &format!("close-{}", code as u16),
            wire::close(code, 7).as_bytes(),
        );
    }
    for code in [
        ErrorCode::Unauthorized,
        ErrorCode::Expired,
        ErrorCode::SessionClosed,
        ErrorCode::NotBound,
        ErrorCode::RelayFull,
        ErrorCode::RateLimited,
        ErrorCode::Draining,
    ] {
        c.put(
            t,
            &format!("error-{}", code as u16),
            wire::error([4; 8], code).as_bytes(),
        );
    }
    c.put(t, "rtp", &rtp(172, 111));
    c.put(t, "rtcp", &rtp(40, 200));
    c.put(t, "dtls", &dtls_client_hello());
    c.put(t, "stun", &stun_binding_request());
}

fn token_seeds(c: &mut Corpus) {
    let ring = veil_fuzz::key_ring();
    let limited = Limits {
        max_pps: 500,
        max_kbps: 2_000,
    };
    let minted = [
        (
            "two-legs",
            ring.mint(ticket(0x0123_4567_89ab_cdef, 1, 2, limited)),
        ),
        (
            "sixteen-legs",
            ring.mint(ticket(42, 15, 16, Limits::default())),
        ),
        (
            "old-key",
            KeyRing::from_keys(&[(1, [1; 32])], 1).mint(ticket(7, 0, 3, Limits::default())),
        ),
        (
            "unknown-key",
            KeyRing::from_keys(&[(9, [9; 32])], 9).mint(ticket(7, 0, 3, Limits::default())),
        ),
    ];
    for (name, token) in &minted {
        c.put("token", name, &token.to_bytes());
        c.put("ticket", name, token.ticket_bytes());
    }
    let mut single = ticket(1, 0, 1, Limits::default());
    single.expires_unix_ms = u64::MAX;
    c.put("ticket", "one-leg-forever", &single.encode());
}

fn key_ring_seeds(c: &mut Corpus) {
    let k = |b: u8| hex(&[b; 32]);
    let t = "key_ring";
    c.put(t, "one-key", format!("1 {} signing\n", k(0x11)).as_bytes());
    c.put(
        t,
        "rotation",
        format!(
            "# Veil cluster key ring: <key-id> <hex-secret> [signing]\n\
             # old key, kept until its tokens expire\n\
             1 {}\n\
             \n\
             2 {} signing\n\
             65535 {}{}\n",
            k(0x11),
            k(0x22),
            k(0x33),
            k(0x44)
        )
        .as_bytes(),
    );
    c.put(
        t,
        "rendered",
        veil_fuzz::key_ring().to_file_format().as_bytes(),
    );
    c.put(
        t,
        "crlf-tabs",
        format!("1\t{}\tsigning\r\n", k(0xab)).as_bytes(),
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cookie_seeds(c: &mut Corpus) {
    let cookies = Cookies::new(*veil_fuzz::COOKIE_SECRET, Duration::from_millis(10_000));
    let ticket = veil_fuzz::key_ring()
        .mint(ticket(7, 0, 2, Limits::default()))
        .ticket_bytes()
        .to_vec();
    let cases: [(&str, u64, u64, &str); 4] = [
        ("v4-fresh", 5_000, 5_000, "127.0.0.2:4000"),
        ("v4-old", 15_000, 5_000, "127.0.0.2:4000"),
        ("v6", 1, 0, "[2001:db8::1]:443"),
        ("mapped", 10_000, 0, "[::ffff:127.0.0.2]:4000"),
    ];
    for (name, now_ms, issued, addr) in cases {
        let addr: SocketAddr = addr.parse().expect("valid address");
        let mut input = Vec::new();
        input.extend_from_slice(&now_ms.to_be_bytes());
        input.extend_from_slice(&10_000u32.to_be_bytes());
        veil_fuzz::encode_socket_addr(addr, &mut input);
        input.push(ticket.len() as u8);
        input.extend_from_slice(&ticket);
        input.extend_from_slice(&cookies.mint(issued, addr, &ticket));
        c.put("cookie", name, &input);
    }
}

fn datagram_seeds(c: &mut Corpus) {
    use Op::*;
    // Source indices (see `datagram::source`): 0, 1 hold session 7 legs 0 and 1; 2 holds
    // session 8 leg 0 (rate limited); 3 and 5 are free; 4 is 0 after a NAT rebinding; 6 is an
    // attacker; 9 is 0 in IPv4-mapped IPv6 form.
    let media = |src: u8, kind: u8, len: u16| Media { src, kind, len };
    let raw = |src: u8, bytes: &[u8]| Datagram {
        src,
        bytes: bytes.to_vec(),
    };
    let ring = veil_fuzz::key_ring();
    let tokens = datagram::tokens();
    let scenarios: Vec<(&str, Vec<Op>)> = vec![
        ("setup-only", vec![]),
        (
            "call",
            vec![
                media(0, 0, 172),
                media(1, 0, 172),
                media(0, 1, 40),
                media(1, 2, 100),
                Advance { ms: 20 },
                media(0, 0, 1200),
            ],
        ),
        (
            "third-leg",
            vec![
                Bind { token: 2, src: 3 },
                media(3, 0, 200),
                media(0, 0, 200),
                Advance { ms: 100 },
                media(1, 2, 60),
            ],
        ),
        (
            "nat-rebinding",
            vec![
                media(0, 0, 100),
                Bind { token: 0, src: 4 },
                media(4, 0, 100),
                media(0, 0, 100),
                media(1, 0, 100),
                Advance { ms: 300 },
                media(0, 0, 100),
            ],
        ),
        (
            "keepalives-and-idle",
            vec![
                media(0, 3, 0),
                media(6, 3, 0),
                Advance { ms: 3_000 },
                media(0, 3, 0),
                Advance { ms: 3_000 },
                media(0, 0, 100),
                media(1, 3, 0),
                Advance { ms: 6_000 },
                media(1, 3, 0),
            ],
        ),
        (
            "replayed-binds",
            vec![
                Bind { token: 4, src: 5 },
                Replay { entry: 0, src: 6 },
                Replay { entry: 1, src: 6 },
                Replay { entry: 0, src: 5 },
                Replay { entry: 0, src: 9 },
                media(6, 0, 100),
                Advance { ms: 11_000 },
                Replay { entry: 0, src: 5 },
            ],
        ),
        (
            "release",
            vec![
                Revoke { session: 0 },
                media(0, 0, 100),
                media(1, 3, 0),
                Advance { ms: 300 },
                Bind { token: 0, src: 0 },
                Tick,
            ],
        ),
        (
            // Session 9's tokens expire at 20 s; keepalives keep its legs from going idle.
            "expiry",
            [Bind { token: 5, src: 3 }, Bind { token: 6, src: 5 }]
                .into_iter()
                .chain((0..4).flat_map(|_| [Advance { ms: 4_000 }, media(3, 3, 0), media(5, 3, 0)]))
                .chain([
                    Advance { ms: 3_900 },
                    media(5, 0, 100),
                    Advance { ms: 200 },
                    media(3, 0, 100),
                    Advance { ms: 300 },
                    media(5, 0, 100),
                    Bind { token: 5, src: 3 },
                    Revoke { session: 2 },
                    Tick,
                ])
                .collect(),
        ),
        (
            "rate-limit",
            std::iter::once(Bind { token: 4, src: 3 })
                .chain((0..80).flat_map(|_| [media(2, 0, 700), Advance { ms: 5 }]))
                .collect(),
        ),
        (
            // Three legs are bound at the start; the relay takes eight.
            "full-and-draining",
            vec![
                Bind { token: 2, src: 3 },
                Bind { token: 4, src: 5 },
                Drain { on: true },
                Bind { token: 5, src: 7 },
                Bind { token: 4, src: 8 },
                Drain { on: false },
                Bind { token: 5, src: 7 },
                Bind { token: 6, src: 4 },
                Bind { token: 7, src: 10 },
                Bind { token: 8, src: 11 },
                Revoke { session: 2 },
                Bind { token: 5, src: 7 },
                Bind { token: 8, src: 11 },
                media(10, 0, 100),
            ],
        ),
        (
            "bad-tokens",
            vec![
                Bind { token: 9, src: 3 },
                Bind { token: 10, src: 3 },
                Bind { token: 11, src: 6 },
                media(3, 0, 100),
            ],
        ),
        (
            "one-address-one-leg",
            vec![
                Bind { token: 4, src: 0 },
                media(0, 0, 100),
                media(1, 0, 100),
                Bind { token: 1, src: 0 },
                media(0, 0, 100),
            ],
        ),
        (
            "raw",
            vec![
                raw(6, &wire::keepalive([9; 8])),
                raw(6, &wire::bind(&tokens[0], [9; 8], None)),
                raw(
                    6,
                    &wire::bind(&tokens[0], [9; 8], Some(&[0; wire::COOKIE_LEN])),
                ),
                raw(6, &stun_binding_request()),
                raw(6, &rtp(100, 111)),
                raw(0, &rtp(100, 111)),
                raw(1, &dtls_client_hello()),
                raw(0, &rtp(11, 111)),
                raw(0, &[0x5a; 12]),
                raw(
                    0,
                    wire::challenge([1; 8], &[0; wire::COOKIE_LEN]).as_bytes(),
                ),
                raw(6, &[]),
                raw(
                    3,
                    &wire::bind(&ring.mint(ticket(7, 2, 3, Limits::default())), [5; 8], None),
                ),
            ],
        ),
    ];
    for (name, ops) in scenarios {
        let bytes = datagram::encode(&ops);
        assert_eq!(datagram::decode(&bytes), ops, "{name} round-trips");
        // Every seed passes the target's own checks; show what each exercises.
        let stats = datagram::run(&bytes);
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| stats.drops_for(**r) > 0)
            .map(|r| format!("{}={}", r.as_str(), stats.drops_for(*r)))
            .collect();
        println!(
            "datagram/{name}: forwarded {}, binds {:?}, control sent {}, drops [{}]",
            stats.forwarded_packets,
            stats.binds,
            stats.control_tx_packets,
            drops.join(" ")
        );
        c.put("datagram", name, &bytes);
    }
}

fn allocate_seeds(c: &mut Corpus) {
    let participant = |id: &str, region: &str, transport: pb::Transport| pb::Participant {
        participant_id: id.into(),
        region: region.into(),
        preferred_transport: transport as i32,
    };
    let req = |call: &str, participants: Vec<pb::Participant>, ttl: u32| {
        pb::AllocateSessionRequest {
            call_id: call.into(),
            participants,
            ttl_seconds: ttl,
        }
        .encode_to_vec()
    };
    let t = "allocate_request";
    c.put(
        t,
        "two",
        &req(
            "call-1",
            vec![
                participant("alice", "", pb::Transport::Unspecified),
                participant("bob", "eu-west", pb::Transport::Udp),
            ],
            0,
        ),
    );
    c.put(
        t,
        "sixteen-quic",
        &req(
            "call-16",
            (0..16)
                .map(|i| participant(&format!("p{i}"), "us-east", pb::Transport::Quic))
                .collect(),
            86_400,
        ),
    );
    c.put(
        t,
        "short-ttl-unicode",
        &req(
            "appel-\u{e9}t\u{e9}",
            vec![
                participant("\u{1F600}", "ap-south", pb::Transport::Udp),
                participant("z\u{fc}rich", "", pb::Transport::Udp),
            ],
            60,
        ),
    );
    c.put(
        t,
        "duplicate-ids",
        &req(
            "call-2",
            vec![
                participant("same", "", pb::Transport::Udp),
                participant("same", "", pb::Transport::Udp),
            ],
            0,
        ),
    );
    c.put(
        t,
        "one-participant",
        &req(
            "call-3",
            vec![participant("solo", "", pb::Transport::Udp)],
            0,
        ),
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut c = Corpus { root, written: 0 };
    wire_seeds(&mut c);
    token_seeds(&mut c);
    key_ring_seeds(&mut c);
    cookie_seeds(&mut c);
    datagram_seeds(&mut c);
    allocate_seeds(&mut c);
    println!("wrote {} seeds under {}", c.written, c.root.display());
}
