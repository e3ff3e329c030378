//! TURN allocations as legs of the one core, in virtual time: the long-term credential exchange,
//! the methods WebRTC clients use, addressed forwarding, and the attacks a TURN server meets
//! (peers outside the session, the relay's own port, 0.0.0.0, IPv4-mapped forms, wrong or stale
//! credentials, expired and revoked legs, amplification).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use veil_protocol::turn::REALM;
use veil_relay_core::stun::{self, Builder, Kind, attr, method};
use veil_relay_core::token::{Limits, Token};
use veil_relay_core::turn::relayed_port;
use veil_relay_core::{Config, DropReason, Endpoint, ForwardingTable, Verdict};
use veil_testkit::stun::{Credentials, channel_data, error_code, find_attr, xor_addr as xor_attr};
use veil_testkit::{Net, addr, replies, rtp};

const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));

fn net() -> Net {
    Net::with_config(
        Config {
            turn_ip: Some(RELAY_IP),
            ..Config::default()
        },
        1_000,
    )
}

fn relayed(leg: u8) -> SocketAddr {
    SocketAddr::new(RELAY_IP, relayed_port(leg))
}

/// A TURN client as WebRTC stacks are: it learns the realm and nonce from a 401, then signs
/// every request with the long-term key of its leg's credentials.
struct Client {
    addr: SocketAddr,
    creds: Credentials,
    nonce: Vec<u8>,
    txn: u32,
}

impl Client {
    fn new(at: SocketAddr, token: &Token) -> Self {
        Self {
            addr: at,
            creds: Credentials::of(token),
            nonce: Vec::new(),
            txn: 0,
        }
    }

    fn next_txn(&mut self) -> [u8; 12] {
        self.txn += 1;
        let mut t = [7u8; 12];
        t[8..].copy_from_slice(&self.txn.to_be_bytes());
        t[0] = self.addr.port() as u8;
        t
    }

    /// A signed request of `method` with `attrs`.
    fn request(&mut self, method: u16, attrs: impl FnOnce(Builder) -> Builder) -> Vec<u8> {
        let txn = self.next_txn();
        self.signed(method, &txn, attrs)
    }

    fn signed(
        &self,
        method: u16,
        txn: &[u8; 12],
        attrs: impl FnOnce(Builder) -> Builder,
    ) -> Vec<u8> {
        self.creds
            .sign(attrs(Builder::new(method, Kind::Request, txn)), &self.nonce)
    }

    /// Allocates, as Chromium does: an unsigned Allocate (28 bytes), a 401, the signed one.
    fn allocate(&mut self, t: &mut ForwardingTable, net: &Net) -> SocketAddr {
        let first = Builder::new(method::ALLOCATE, Kind::Request, &self.next_txn())
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        assert_eq!(first.as_bytes().len(), 28);
        let v = t.handle_datagram(net.now, self.addr, first.as_bytes());
        assert!(matches!(v, Verdict::Control), "{v:?}");
        let out = replies(t);
        assert_eq!(out.len(), 1);
        let answer = out[0].msg.as_bytes().to_vec();
        assert!(
            answer.len() <= 2 * 28,
            "401 of {} bytes for 28",
            answer.len()
        );
        let m = stun::parse(&answer).unwrap();
        assert_eq!((m.kind, error_code(&answer)), (Kind::Error, Some(401)));
        assert_eq!(m.realm, Some(REALM.as_bytes()));
        self.nonce = m.nonce.unwrap().to_vec();
        let signed = self.request(method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        });
        let ok = self.exchange(t, net, &signed);
        let m = stun::parse(&ok).unwrap();
        assert_eq!(m.kind, Kind::Success, "{:?}", error_code(&ok));
        assert!(
            m.verify_integrity(&self.creds.key),
            "the answer carries MESSAGE-INTEGRITY"
        );
        xor_attr(&ok, attr::XOR_RELAYED_ADDRESS).unwrap()
    }

    /// Allocates where the relay is expected to refuse: the unsigned Allocate's 401 gives the
    /// nonce, and the signed one's error code is returned.
    fn allocate_refused(&mut self, t: &mut ForwardingTable, net: &Net) -> Option<u16> {
        let first = Builder::new(method::ALLOCATE, Kind::Request, &self.next_txn())
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        t.handle_datagram(net.now, self.addr, first.as_bytes());
        self.nonce = stun::parse(replies(t)[0].msg.as_bytes())
            .unwrap()
            .nonce
            .unwrap()
            .to_vec();
        let req = self.request(method::ALLOCATE, |x| {
            x.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        });
        error_code(&self.exchange(t, net, &req))
    }

    /// Sends a request, returns the one answer.
    fn exchange(&self, t: &mut ForwardingTable, net: &Net, req: &[u8]) -> Vec<u8> {
        t.handle_datagram(net.now, self.addr, req);
        let out = replies(t);
        assert_eq!(out.len(), 1, "one answer");
        assert_eq!(out[0].dst, Endpoint::TurnUdp(self.addr));
        out[0].msg.as_bytes().to_vec()
    }

    fn permit(&mut self, t: &mut ForwardingTable, net: &Net, peer: SocketAddr) -> Option<u16> {
        let req = self.request(method::CREATE_PERMISSION, |b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        });
        error_code(&self.exchange(t, net, &req))
    }

    fn channel(
        &mut self,
        t: &mut ForwardingTable,
        net: &Net,
        ch: u16,
        peer: SocketAddr,
    ) -> Option<u16> {
        let req = self.request(method::CHANNEL_BIND, |b| {
            b.u32(attr::CHANNEL_NUMBER, u32::from(ch) << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        });
        error_code(&self.exchange(t, net, &req))
    }

    fn send_to(&mut self, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let txn = self.next_txn();
        let mut out = vec![0u8; 1600];
        // A Send indication is a Data indication with another method.
        let n = stun::write_data_indication(&mut out, &txn, peer, payload);
        out.truncate(n);
        out[1] = 0x16; // Send indication (0x0016)
        out
    }
}

/// The datagram a relayed verdict sends, and where.
fn relayed_datagram(v: &Verdict, pkt: &[u8]) -> (Endpoint, Vec<u8>) {
    let Verdict::Relay(r) = v else {
        panic!("not relayed: {v:?}");
    };
    let mut out = [0u8; 1600];
    let n = r.datagram(pkt, &mut out, &[1; 12]);
    (r.dst, out[..n].to_vec())
}

/// Two participants of session 1, allocated and permitting each other.
fn call(net: &Net, t: &mut ForwardingTable) -> (Client, Client) {
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 2));
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    assert_eq!(a.allocate(t, net), relayed(0));
    assert_eq!(b.allocate(t, net), relayed(1));
    assert_eq!(a.permit(t, net, relayed(1)), None);
    assert_eq!(b.permit(t, net, relayed(0)), None);
    (a, b)
}

#[test]
fn send_indications_then_channels_carry_media_between_two_allocations() {
    let net = net();
    let mut t = net.worker();
    let (mut a, mut b) = call(&net, &mut t);
    // Chromium's ICE checks and first DTLS flight: Send indications, delivered as Data
    // indications from the sender's relayed address.
    let media = rtp(1, 160);
    let send = a.send_to(relayed(1), &media);
    let v = t.handle_datagram(net.now, a.addr, &send);
    let (dst, out) = relayed_datagram(&v, &send);
    assert_eq!(dst, Endpoint::TurnUdp(b.addr));
    let m = stun::parse(&out).unwrap();
    assert_eq!((m.method, m.kind), (method::DATA, Kind::Indication));
    assert_eq!(m.peers().next(), Some(relayed(0)));
    assert_eq!(m.data, Some(&media[..]));
    // B binds a channel to A: A's data now reaches B as ChannelData on B's channel, and B's
    // ChannelData reaches A (who has no channel) as a Data indication.
    assert_eq!(b.channel(&mut t, &net, 0x4001, relayed(0)), None);
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &media));
    let (_, out) = relayed_datagram(&v, &a.send_to(relayed(1), &media));
    assert_eq!(out, channel_data(0x4001, &media, false));
    let cd = channel_data(0x4001, &media, false);
    let v = t.handle_datagram(net.now, b.addr, &cd);
    let (dst, out) = relayed_datagram(&v, &cd);
    assert_eq!(dst, Endpoint::TurnUdp(a.addr));
    assert_eq!(stun::parse(&out).unwrap().data, Some(&media[..]));
    // Both on channels (A uses 0x4ABC): ChannelData in, ChannelData out, the number rewritten.
    assert_eq!(a.channel(&mut t, &net, 0x4ABC, relayed(1)), None);
    let cd = channel_data(0x4ABC, &media, false);
    let v = t.handle_datagram(net.now, a.addr, &cd);
    let (dst, out) = relayed_datagram(&v, &cd);
    assert_eq!(
        (dst, out),
        (
            Endpoint::TurnUdp(b.addr),
            channel_data(0x4001, &media, false)
        )
    );
    assert_eq!(t.turn_stats().forwarded_packets, 4);
    assert_eq!(
        t.stats().forwarded_packets,
        0,
        "TURN is counted as turn-udp only"
    );
    assert_eq!(net.node.directory.turn_legs(), 2);
}

#[test]
fn a_retransmitted_request_gets_the_same_answer_and_a_new_allocate_gets_437() {
    let net = net();
    let mut t = net.worker();
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 2));
    a.allocate(&mut t, &net);
    // Chromium retransmits its signed Allocate: same transaction, same answer, not 437.
    let txn = [0x33; 12];
    let req = a.signed(method::REFRESH, &txn, |b| b.u32(attr::LIFETIME, 600));
    let first = a.exchange(&mut t, &net, &req);
    assert_eq!(a.exchange(&mut t, &net, &req), first);
    let again = a.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
    });
    assert_eq!(error_code(&a.exchange(&mut t, &net, &again)), Some(437));
}

#[test]
fn peers_outside_the_session_are_refused_with_403_and_nothing_is_forwarded() {
    let net = net();
    let mut t = net.worker();
    let (mut a, _b) = call(&net, &mut t);
    // An allocation of another session, on the same relay.
    let mut other = Client::new(addr(9, 5000), &net.token(2, 1, 2));
    assert_eq!(other.allocate(&mut t, &net), relayed(1));
    let forbidden = [
        SocketAddr::new(RELAY_IP, relayed_port(5)), // no allocation
        SocketAddr::new(RELAY_IP, 40000),           // the relay's own port
        SocketAddr::new(RELAY_IP, relayed_port(0)), // its own relayed address
        SocketAddr::new(RELAY_IP, relayed_port(5) + 1), // the odd port of no allocation
        "0.0.0.0:49154".parse().unwrap(),           // 0.0.0.0
        "127.0.0.1:49154".parse().unwrap(),         // loopback
        "[::ffff:203.0.113.1]:49154".parse().unwrap(), // IPv4-mapped IPv6
        "[::ffff:cb00:7101]:49154".parse().unwrap(), // the same, hex
        addr(3, 5000),                              // the peer's own address
    ];
    for peer in forbidden {
        assert_eq!(a.permit(&mut t, &net, peer), Some(403), "{peer}");
        assert_eq!(a.channel(&mut t, &net, 0x4002, peer), Some(403), "{peer}");
        let v = t.handle_datagram(net.now, a.addr, &a.send_to(peer, &rtp(1, 100)));
        assert!(
            matches!(v, Verdict::Drop(DropReason::TurnForbiddenPeer)),
            "{peer}: {v:?}"
        );
        assert!(replies(&mut t).is_empty(), "an indication gets no answer");
    }
    // Other's relayed address is the same as B's (relayed addresses are keys within a
    // session): A's permission names B, never the other session's allocation.
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &rtp(2, 100)));
    let (dst, _) = relayed_datagram(&v, &a.send_to(relayed(1), &rtp(2, 100)));
    assert_ne!(dst, Endpoint::TurnUdp(other.addr));
    // The odd port above B's relayed port names B too (an RTCP port; permissions ignore the
    // port, RFC 8656 §9), and nothing else: media sent there reaches B.
    assert_eq!(
        a.permit(&mut t, &net, SocketAddr::new(RELAY_IP, relayed_port(1) + 1)),
        None
    );
    let odd = a.send_to(SocketAddr::new(RELAY_IP, relayed_port(1) + 1), &rtp(3, 100));
    let v = t.handle_datagram(net.now, a.addr, &odd);
    let (dst, _) = relayed_datagram(&v, &odd);
    assert_eq!(dst, Endpoint::TurnUdp(addr(3, 5000)));
    // The other session's client cannot reach session 1 at all: its leg 0 is not allocated.
    assert_eq!(other.permit(&mut t, &net, relayed(0)), Some(403));
    assert!(t.turn_stats().drops_for(DropReason::TurnForbiddenPeer) >= 3 * forbidden.len() as u64);
}

#[test]
fn data_needs_a_permission_on_both_allocations() {
    let net = net();
    let mut t = net.worker();
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 2));
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    a.allocate(&mut t, &net);
    b.allocate(&mut t, &net);
    let media = rtp(1, 100);
    // A has no permission for B yet.
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &media));
    assert!(
        matches!(v, Verdict::Drop(DropReason::TurnNoPermission)),
        "{v:?}"
    );
    // A permits B, but B has not permitted A: B would not accept it.
    assert_eq!(a.permit(&mut t, &net, relayed(1)), None);
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &media));
    assert!(
        matches!(v, Verdict::Drop(DropReason::TurnNoPermission)),
        "{v:?}"
    );
    // ChannelData on a channel A never bound.
    let v = t.handle_datagram(net.now, a.addr, &channel_data(0x4000, &media, false));
    assert!(
        matches!(v, Verdict::Drop(DropReason::TurnNoPermission)),
        "{v:?}"
    );
    assert_eq!(b.permit(&mut t, &net, relayed(0)), None);
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &media));
    assert!(matches!(v, Verdict::Relay(_)), "{v:?}");
    // Permissions last 300 s: after that (refreshed allocations, no CreatePermission), none.
    let mut net = net;
    for _ in 0..6 {
        net.advance(Duration::from_secs(55));
        let keep = a.request(method::REFRESH, |b| b.u32(attr::LIFETIME, 600));
        assert_eq!(error_code(&a.exchange(&mut t, &net, &keep)), None);
        let keep = b.request(method::REFRESH, |b| b.u32(attr::LIFETIME, 600));
        assert_eq!(error_code(&b.exchange(&mut t, &net, &keep)), None);
        t.handle_timeout(net.now);
    }
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &media));
    assert!(
        matches!(v, Verdict::Drop(DropReason::TurnNoPermission)),
        "{v:?}"
    );
}

#[test]
fn channel_numbers_outside_0x4000_to_0x4fff_and_clashes_get_400() {
    let net = net();
    let mut t = net.worker();
    let (mut a, _b) = call(&net, &mut t);
    for ch in [0x3FFF, 0x5000, 0x5F00, 0x7FFE] {
        assert_eq!(
            a.channel(&mut t, &net, ch, relayed(1)),
            Some(400),
            "{ch:#x}"
        );
    }
    assert_eq!(a.channel(&mut t, &net, 0x4000, relayed(1)), None);
    // Refreshing the same binding is fine; another channel for the same peer is not.
    assert_eq!(a.channel(&mut t, &net, 0x4000, relayed(1)), None);
    assert_eq!(a.channel(&mut t, &net, 0x4001, relayed(1)), Some(400));
}

#[test]
fn wrong_credentials_stale_nonces_expired_and_revoked_legs_get_their_codes() {
    let mut net = net();
    let mut t = net.worker();
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 2));
    a.allocate(&mut t, &net);
    // Wrong credential: 401, a fresh nonce, nothing changes.
    let mut wrong = Client::new(addr(4, 5000), &net.token(1, 1, 2));
    wrong.creds = Credentials::new(&wrong.creds.username.clone(), "guessed");
    wrong.nonce = a.nonce.clone();
    let req = wrong.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
    });
    assert_eq!(error_code(&wrong.exchange(&mut t, &net, &req)), Some(401));
    // A's nonce is bound to A's address: from B's address it is not this source's (401).
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    b.nonce = a.nonce.clone();
    let req = b.request(method::ALLOCATE, |x| {
        x.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
    });
    assert_eq!(error_code(&b.exchange(&mut t, &net, &req)), Some(401));
    // After 10 minutes the nonce is stale: 438 and a new nonce, which then works.
    net.advance(Duration::from_secs(601));
    let req = a.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 600));
    let stale = a.exchange(&mut t, &net, &req);
    assert_eq!(error_code(&stale), Some(438));
    a.nonce = stun::parse(&stale).unwrap().nonce.unwrap().to_vec();
    let req = a.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 600));
    assert_eq!(error_code(&a.exchange(&mut t, &net, &req)), None);
    // An expired token: 401.
    let old = net.token_with(3, 0, 2, Limits::default(), 1_000);
    let mut late = Client::new(addr(5, 5000), &old);
    assert_eq!(late.allocate_refused(&mut t, &net), Some(401));
    // A revoked session: its allocation forwards nothing more, and a new Allocate gets 403.
    b.nonce.clear();
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    b.allocate(&mut t, &net);
    assert_eq!(a.permit(&mut t, &net, relayed(1)), None);
    net.node.revoke(
        veil_relay_core::SessionId(1),
        veil_testkit::T0_UNIX_MS + 3_600_000,
    );
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &rtp(1, 100)));
    assert!(
        matches!(v, Verdict::Drop(DropReason::SessionClosed)),
        "{v:?}"
    );
    assert!(replies(&mut t).is_empty(), "no Veil CLOSE to a TURN client");
    let mut again = Client::new(addr(6, 5000), &net.token(1, 0, 2));
    assert_eq!(again.allocate_refused(&mut t, &net), Some(403));
}

#[test]
fn binding_requests_and_unsigned_garbage_get_no_answer_and_401s_stay_small() {
    let net = net();
    let mut t = net.worker();
    // A plain Binding request (Chromium sends one): dropped, an answer would amplify.
    let binding = Builder::new(method::BINDING, Kind::Request, &[1; 12]);
    let v = t.handle_datagram(net.now, addr(2, 5000), binding.as_bytes());
    assert!(matches!(v, Verdict::Drop(DropReason::StunBinding)));
    // An unsigned CreatePermission from nowhere: a 401 no larger than the request.
    let req = Builder::new(method::CREATE_PERMISSION, Kind::Request, &[2; 12])
        .xor_addr(attr::XOR_PEER_ADDRESS, relayed(1));
    t.handle_datagram(net.now, addr(2, 5000), req.as_bytes());
    for out in replies(&mut t) {
        assert!(out.msg.as_bytes().len() <= req.as_bytes().len());
    }
    // A bare 20-byte Allocate: no answer fits twice its size.
    let bare = Builder::new(method::ALLOCATE, Kind::Request, &[3; 12]);
    t.handle_datagram(net.now, addr(2, 5000), bare.as_bytes());
    assert!(replies(&mut t).is_empty());
    // 401s are rate-limited per source, like binds: a flood gets at most the burst.
    let first = Builder::new(method::ALLOCATE, Kind::Request, &[4; 12])
        .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
    let mut answered = 0;
    for _ in 0..1000 {
        t.handle_datagram(net.now, addr(7, 5000), first.as_bytes());
        answered += replies(&mut t).len();
    }
    assert!(answered <= 100, "{answered} answers to a flood");
    // Raw media and ChannelData from a source with no allocation: dropped, counted.
    let v = t.handle_datagram(
        net.now,
        addr(8, 5000),
        &channel_data(0x4000, &rtp(1, 50), false),
    );
    assert!(matches!(v, Verdict::Drop(DropReason::TurnNoAllocation)));
}

#[test]
fn unknown_comprehension_required_attributes_get_420_and_refresh_zero_releases() {
    let net = net();
    let mut t = net.worker();
    let (mut a, mut b) = call(&net, &mut t);
    let req = a.request(method::REFRESH, |x| x.attr(0x0031, b"?"));
    let ans = a.exchange(&mut t, &net, &req);
    assert_eq!(error_code(&ans), Some(420));
    assert_eq!(
        find_attr(&ans, attr::UNKNOWN_ATTRIBUTES),
        Some(&[0x00, 0x31][..])
    );
    // Refresh with LIFETIME 0: released; the peer's data to it goes nowhere.
    let req = b.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 0));
    let ans = b.exchange(&mut t, &net, &req);
    assert_eq!(find_attr(&ans, attr::LIFETIME), Some(&[0, 0, 0, 0][..]));
    // B's relayed address names no allocation any more.
    let v = t.handle_datagram(net.now, a.addr, &a.send_to(relayed(1), &rtp(1, 100)));
    assert!(
        matches!(v, Verdict::Drop(DropReason::TurnForbiddenPeer)),
        "{v:?}"
    );
    let req = b.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 600));
    assert_eq!(error_code(&b.exchange(&mut t, &net, &req)), Some(437));
    // An allocation's lifetime never outlives its token (here: an hour).
    let req = a.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 100_000));
    let ans = a.exchange(&mut t, &net, &req);
    let life = u32::from_be_bytes(find_attr(&ans, attr::LIFETIME).unwrap().try_into().unwrap());
    assert!(life <= 3600, "{life}");
}

#[test]
fn a_leg_may_hold_several_allocations_and_releasing_one_keeps_the_others() {
    // aiortc gathers on one socket per transceiver with the same credentials, then releases
    // the ones BUNDLE does not use.
    let net = net();
    let mut t = net.worker();
    let token = net.token(1, 0, 2);
    let mut first = Client::new(addr(2, 5000), &token);
    let mut second = Client::new(addr(2, 5001), &token);
    assert_eq!(first.allocate(&mut t, &net), relayed(0));
    assert_eq!(second.allocate(&mut t, &net), relayed(16));
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    assert_eq!(b.allocate(&mut t, &net), relayed(1));
    // The second is released; the first still talks to B, both ways.
    let req = second.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 0));
    assert_eq!(error_code(&second.exchange(&mut t, &net, &req)), None);
    assert_eq!(first.permit(&mut t, &net, relayed(1)), None);
    assert_eq!(b.permit(&mut t, &net, relayed(0)), None);
    let send = first.send_to(relayed(1), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, first.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(b.addr));
    let send = b.send_to(relayed(0), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, b.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(first.addr));
    // A leg's own other allocation is not a peer.
    assert_eq!(first.permit(&mut t, &net, relayed(16)), Some(403));
    // At most eight allocations a leg: the ninth gets 486.
    for port in 5002..5009 {
        Client::new(addr(2, port), &token).allocate(&mut t, &net);
    }
    let mut ninth = Client::new(addr(2, 5009), &token);
    assert_eq!(ninth.allocate_refused(&mut t, &net), Some(486));
}

#[test]
fn an_allocation_lives_by_its_lifetime_not_the_idle_timeout() {
    // A call that rings: Chromium sends an allocation nothing until it has a peer, and
    // refreshes only near the end of the lifetime.
    let mut net = net();
    let mut t = net.worker();
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 2));
    a.allocate(&mut t, &net);
    for _ in 0..12 {
        net.advance(Duration::from_secs(10));
        t.handle_timeout(net.now);
    }
    // Two minutes of silence, four times the idle timeout: still allocated.
    let mut b = Client::new(addr(3, 5000), &net.token(1, 1, 2));
    b.allocate(&mut t, &net);
    assert_eq!(a.permit(&mut t, &net, relayed(1)), None);
    assert_eq!(net.node.directory.turn_legs(), 2);
    // Unrefreshed, it ends at its lifetime (600 s): B's permission for it is then refused.
    for _ in 0..50 {
        net.advance(Duration::from_secs(10));
        t.handle_timeout(net.now);
        let keep = b.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 600));
        assert_eq!(error_code(&b.exchange(&mut t, &net, &keep)), None);
    }
    assert_eq!(net.node.directory.turn_legs(), 1);
    assert_eq!(b.permit(&mut t, &net, relayed(0)), Some(403));
}

#[test]
fn a_removed_participants_allocations_end_and_the_others_go_on() {
    // RemoveParticipant revokes one leg: every allocation of it ends (a leg may hold several),
    // nobody relays to it, and it cannot allocate again; the others keep talking.
    let net = net();
    let mut t = net.worker();
    let mut a = Client::new(addr(2, 5000), &net.token(1, 0, 3));
    let b_token = net.token(1, 1, 3);
    let mut b = Client::new(addr(3, 5000), &b_token);
    let mut b2 = Client::new(addr(3, 5001), &b_token);
    let mut c = Client::new(addr(4, 5000), &net.token(1, 2, 3));
    assert_eq!(a.allocate(&mut t, &net), relayed(0));
    assert_eq!(b.allocate(&mut t, &net), relayed(1));
    assert_eq!(b2.allocate(&mut t, &net), relayed(17));
    assert_eq!(c.allocate(&mut t, &net), relayed(2));
    for peer in [relayed(1), relayed(17), relayed(2)] {
        assert_eq!(a.permit(&mut t, &net, peer), None);
    }
    assert_eq!(b.permit(&mut t, &net, relayed(0)), None);
    assert_eq!(c.permit(&mut t, &net, relayed(0)), None);
    let send = a.send_to(relayed(1), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, a.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(b.addr), "B is in the call");

    let mut gone = net.node.revoke_leg(
        veil_relay_core::SessionId(1),
        1,
        veil_testkit::T0_UNIX_MS + 3_600_000,
    );
    gone.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        gone,
        vec![Endpoint::TurnUdp(b.addr), Endpoint::TurnUdp(b2.addr)]
    );
    // B's media goes nowhere, and B gets no answer that says more.
    let v = t.handle_datagram(net.now, b.addr, &b.send_to(relayed(0), &rtp(1, 100)));
    assert!(
        matches!(v, Verdict::Drop(DropReason::SessionClosed)),
        "{v:?}"
    );
    assert!(replies(&mut t).is_empty());
    // Nobody reaches B at either relayed address; A still reaches C.
    for peer in [relayed(1), relayed(17)] {
        let send = a.send_to(peer, &rtp(1, 100));
        let v = t.handle_datagram(net.now, a.addr, &send);
        assert!(
            !matches!(v, Verdict::Relay(_)),
            "relayed to a removed leg: {v:?}"
        );
    }
    let send = a.send_to(relayed(2), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, a.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(c.addr));
    let send = c.send_to(relayed(0), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, c.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(a.addr));
    // B's credentials allocate nothing again, from any address: 403.
    let mut again = Client::new(addr(7, 5000), &b_token);
    assert_eq!(again.allocate_refused(&mut t, &net), Some(403));
}

#[test]
fn an_extended_sessions_allocations_refresh_and_allocate_past_their_tokens_expiry() {
    // ExtendSession: the credentials stay the same, and the relay honours them until the new
    // expiry. Before it, an allocation's lifetime stops at the token's expiry; after it, a
    // Refresh grants the full lifetime, media goes on past the token's expiry, and the same
    // credentials allocate again. Another session's expired credentials still allocate nothing.
    let mut net = net();
    let mut t = net.worker();
    let a_token = net.token_with(1, 0, 2, Limits::default(), 120_000);
    let mut a = Client::new(addr(2, 5000), &a_token);
    let mut b = Client::new(
        addr(3, 5000),
        &net.token_with(1, 1, 2, Limits::default(), 120_000),
    );
    assert_eq!(a.allocate(&mut t, &net), relayed(0));
    assert_eq!(b.allocate(&mut t, &net), relayed(1));
    assert_eq!(a.permit(&mut t, &net, relayed(1)), None);
    assert_eq!(b.permit(&mut t, &net, relayed(0)), None);
    let lifetime = |a: &mut Client, t: &mut ForwardingTable, net: &Net| {
        let req = a.request(method::REFRESH, |x| x.u32(attr::LIFETIME, 600));
        let ans = a.exchange(t, net, &req);
        assert_eq!(error_code(&ans), None);
        u32::from_be_bytes(find_attr(&ans, attr::LIFETIME).unwrap().try_into().unwrap())
    };
    assert!(
        lifetime(&mut a, &mut t, &net) <= 120,
        "capped at the token's expiry"
    );

    net.node.extend(
        veil_relay_core::SessionId(1),
        veil_testkit::T0_UNIX_MS + 7_200_000,
    );
    assert_eq!(lifetime(&mut a, &mut t, &net), 600);
    assert_eq!(lifetime(&mut b, &mut t, &net), 600);
    net.advance(Duration::from_secs(121));
    t.handle_timeout(net.now);
    let send = a.send_to(relayed(1), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, a.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(b.addr), "past the token's expiry");
    let send = b.send_to(relayed(0), &rtp(1, 100));
    let (dst, _) = relayed_datagram(&t.handle_datagram(net.now, b.addr, &send), &send);
    assert_eq!(dst, Endpoint::TurnUdp(a.addr));
    // The same credentials, from a new address (another WebRTC candidate): allocated.
    let mut a2 = Client::new(addr(5, 5000), &a_token);
    assert_eq!(a2.allocate(&mut t, &net), relayed(16));

    let mut other = Client::new(
        addr(6, 5000),
        &net.token_with(2, 0, 2, Limits::default(), 120_000),
    );
    assert_eq!(
        other.allocate_refused(&mut t, &net),
        Some(401),
        "not extended"
    );
}
