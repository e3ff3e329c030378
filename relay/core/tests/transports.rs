//! The same scenarios for UDP-only, QUIC-only and mixed sessions, in virtual time: every
//! transport is one kind of endpoint of the one core. A UDP client binds through a worker's
//! table with the cookie round; a QUIC client through its connection's own table (as the QUIC
//! shell has one per connection) with a channel-bound BIND on the connection's stream.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use veil_relay_core::token::{Limits, Token};
use veil_relay_core::wire::{self, EXPORTER_LEN, ErrorCode, RelayMessage};
use veil_relay_core::{
    ConnId, DropReason, Endpoint, Event, ForwardingTable, LegStatus, SessionId, Stats, Verdict,
};
use veil_testkit::{Net, T0_UNIX_MS, addr, replies, rtp, targets};

fn error_code(b: &[u8]) -> Option<u16> {
    match wire::parse_relay(b) {
        Ok(RelayMessage::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Udp,
    Quic,
}

const UDP_ONLY: [Kind; 3] = [Kind::Udp; 3];
const QUIC_ONLY: [Kind; 3] = [Kind::Quic; 3];
const MIXED: [Kind; 3] = [Kind::Udp, Kind::Quic, Kind::Quic];

/// One participant: its endpoint, its address, and which table serves it.
#[derive(Debug, Clone, Copy)]
struct Client {
    kind: Kind,
    ep: Endpoint,
    addr: SocketAddr,
    table: usize,
    exporter: [u8; EXPORTER_LEN],
}

/// A relay node seen through its tables: table 0 is the UDP worker, the others one QUIC
/// connection each.
struct Relay {
    net: Net,
    tables: Vec<ForwardingTable>,
}

impl Relay {
    fn new() -> Self {
        let net = Net::new();
        let udp = net.worker();
        Self {
            net,
            tables: vec![udp],
        }
    }

    /// A new client of `kind` at 127.0.0.`last`.
    fn client(&mut self, kind: Kind, last: u8) -> Client {
        let addr = addr(last, 5000);
        match kind {
            Kind::Udp => Client {
                kind,
                ep: Endpoint::Udp(addr),
                addr,
                table: 0,
                exporter: [0; EXPORTER_LEN],
            },
            Kind::Quic => {
                let t = self.net.connection();
                self.tables.push(t);
                Client {
                    kind,
                    ep: Endpoint::Quic(ConnId(u64::from(last))),
                    addr,
                    table: self.tables.len() - 1,
                    exporter: [last; EXPORTER_LEN],
                }
            }
        }
    }

    fn table(&mut self, c: &Client) -> &mut ForwardingTable {
        &mut self.tables[c.table]
    }

    /// Binds `c` with `token`; returns the final answer's bytes.
    fn bind(&mut self, c: &Client, token: &Token) -> Vec<u8> {
        let now = self.net.now;
        match c.kind {
            Kind::Udp => veil_testkit::udp_bind(&mut self.tables[c.table], now, c.addr, token),
            Kind::Quic => {
                let t = &mut self.tables[c.table];
                let answer = veil_testkit::quic_bind(t, now, c.ep, c.addr, token, &c.exporter);
                answer.msg.as_bytes().to_vec()
            }
        }
    }

    fn send(&mut self, c: &Client, pkt: &[u8]) -> Verdict {
        let now = self.net.now;
        self.table(c).handle_datagram(now, c.ep, pkt)
    }

    fn timeout(&mut self) {
        let now = self.net.now;
        for t in &mut self.tables {
            t.handle_timeout(now);
        }
    }
}

fn bind_ok(t: &[u8]) -> bool {
    matches!(
        wire::parse_relay(t),
        Ok(RelayMessage::BindOk {
            idle_timeout_secs: 30,
            ..
        })
    )
}

/// Binds a session of `kinds.len()` legs, one client per kind.
fn call(kinds: &[Kind], ttl_ms: u64) -> (Relay, Vec<Client>) {
    let mut r = Relay::new();
    let n = kinds.len() as u8;
    let mut clients = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        let c = r.client(*k, 10 + i as u8);
        let token = r.net.token_with(7, i as u8, n, Limits::default(), ttl_ms);
        let answer = r.bind(&c, &token);
        assert!(bind_ok(&answer), "{k:?}: {answer:?}");
        clients.push(c);
    }
    (r, clients)
}

fn sorted(mut v: Vec<Endpoint>) -> Vec<Endpoint> {
    v.sort_by_key(|e| format!("{e:?}"));
    v
}

fn others(clients: &[Client], i: usize) -> Vec<Endpoint> {
    sorted(
        clients
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| c.ep)
            .collect(),
    )
}

#[test]
fn every_transport_mix_binds_forwards_and_keeps_alive() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 3_600_000);
        for (i, c) in clients.iter().enumerate() {
            let v = r.send(c, &rtp(1, 120));
            assert_eq!(sorted(targets(&v)), others(&clients, i), "{kinds:?}");
            drop(v);
            assert!(matches!(
                r.send(c, &wire::keepalive([3; 8])),
                Verdict::Control
            ));
            let out = replies(r.table(c));
            assert_eq!(out.len(), 1);
            assert!(!out[0].reliable, "KEEPALIVE_ACK is a datagram");
            assert_eq!(
                out[0].msg.as_bytes(),
                wire::keepalive_ack([3; 8]).as_bytes()
            );
        }
    }
}

/// Regression: the QUIC shell used to acknowledge a KEEPALIVE from a revoked leg until its next
/// sweep. Every transport now answers it as UDP does, from the one core: CLOSE, never an ACK.
#[test]
fn every_transport_answers_a_keepalive_after_revocation_with_close_not_ack() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 3_600_000);
        r.net.node.revoke(SessionId(7), T0_UNIX_MS + 3_600_000);
        for c in &clients {
            assert!(matches!(
                r.send(c, &wire::keepalive([4; 8])),
                Verdict::Drop(DropReason::SessionClosed)
            ));
            let out = replies(r.table(c));
            assert_eq!(out.len(), 1, "{kinds:?} {c:?}");
            assert_eq!(
                out[0].msg.as_bytes(),
                wire::close(ErrorCode::SessionClosed, 7).as_bytes()
            );
            assert!(out[0].reliable, "CLOSE goes on a QUIC leg's stream");
            assert!(
                std::iter::from_fn(|| r.table(c).poll_event()).any(|e| matches!(
                    e,
                    Event::Unbound {
                        why: LegStatus::Closed,
                        ..
                    }
                ))
            );
            assert!(!r.table(c).serves(c.ep));
        }
    }
}

/// A participant removed from a call that goes on (`RemoveParticipant`, one leg revoked): on
/// every transport mix, its media is dropped and its KEEPALIVE answered with CLOSE, nobody
/// forwards to it any more, the two others still reach each other, and its token no longer
/// binds, over its own transport or the other one.
#[test]
fn every_transport_drops_a_removed_leg_and_keeps_the_others() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 3_600_000);
        let unbound = r
            .net
            .node
            .revoke_leg(SessionId(7), 1, T0_UNIX_MS + 3_600_000);
        assert_eq!(unbound, vec![clients[1].ep], "{kinds:?}");
        let removed = clients[1];
        assert!(matches!(
            r.send(&removed, &rtp(1, 120)),
            Verdict::Drop(DropReason::SessionClosed)
        ));
        let out = replies(r.table(&removed));
        assert_eq!(out.len(), 1, "{kinds:?}");
        assert_eq!(
            out[0].msg.as_bytes(),
            wire::close(ErrorCode::SessionClosed, 7).as_bytes(),
            "{kinds:?}"
        );
        assert!(!r.table(&removed).serves(removed.ep));
        for (i, j) in [(0, 2), (2, 0)] {
            let v = r.send(&clients[i], &rtp(1, 120));
            assert_eq!(
                targets(&v),
                vec![clients[j].ep],
                "{kinds:?}: {i} reaches {j} only"
            );
            drop(v);
            assert!(matches!(
                r.send(&clients[i], &wire::keepalive([5; 8])),
                Verdict::Control
            ));
            let out = replies(r.table(&clients[i]));
            assert_eq!(
                out[0].msg.as_bytes(),
                wire::keepalive_ack([5; 8]).as_bytes()
            );
        }
        let token = r.net.token_with(7, 1, 3, Limits::default(), 3_600_000);
        for kind in [Kind::Udp, Kind::Quic] {
            let again = r.client(kind, 40 + kind as u8);
            let answer = r.bind(&again, &token);
            assert_eq!(
                error_code(&answer),
                Some(ErrorCode::SessionClosed as u16),
                "{kinds:?}, again over {kind:?}"
            );
        }
    }
}

/// Regression: the QUIC shell ended a leg whose token expired only at its next sweep. Now the
/// first packet after expiry ends it, with CLOSE `EXPIRED`, on every transport.
#[test]
fn every_transport_ends_a_leg_the_moment_its_token_expires() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 1_000);
        r.net.advance(Duration::from_millis(1_001));
        for c in &clients {
            assert!(matches!(
                r.send(c, &rtp(9, 100)),
                Verdict::Drop(DropReason::Expired)
            ));
            let out = replies(r.table(c));
            assert_eq!(out.len(), 1, "{kinds:?}");
            assert_eq!(
                out[0].msg.as_bytes(),
                wire::close(ErrorCode::Expired, 7).as_bytes()
            );
            assert!(
                !r.table(c).serves(c.ep),
                "ended without waiting for a sweep"
            );
        }
        assert_eq!(r.net.node.directory.legs(), 0);
    }
}

/// ExtendSession: the tokens stay the same and every transport's legs are served past their
/// expiry, with no packet dropped at the old expiry (the first packet after it finds the new
/// one), not ended by the sweep, and the same tokens bind again (a client moving, or failing
/// over to this relay); a removed participant stays removed in the extra time; at the new
/// expiry the legs end as they would have.
#[test]
fn every_transport_serves_an_extended_session_past_its_tokens_expiry() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 1_000);
        r.net.node.revoke_leg(SessionId(7), 2, T0_UNIX_MS + 1_000);
        let extended = T0_UNIX_MS + 60_000;
        r.net.node.extend(SessionId(7), extended);
        r.net.advance(Duration::from_millis(1_001));
        for (i, j) in [(0, 1), (1, 0)] {
            let v = r.send(&clients[i], &rtp(1, 120));
            assert_eq!(
                targets(&v),
                vec![clients[j].ep],
                "{kinds:?}: {i} past the token's expiry"
            );
        }
        r.net.advance(Duration::from_secs(20));
        r.net.node.tick(r.net.now);
        r.timeout();
        for t in &mut r.tables {
            // The removed leg's CLOSE, from the sweep.
            replies(t);
        }
        for c in &clients[..2] {
            assert!(r.table(c).serves(c.ep), "{kinds:?}: the sweep keeps {c:?}");
            assert!(matches!(
                r.send(c, &wire::keepalive([6; 8])),
                Verdict::Control
            ));
            assert_eq!(
                replies(r.table(c))[0].msg.as_bytes(),
                wire::keepalive_ack([6; 8]).as_bytes()
            );
        }
        for kind in [Kind::Udp, Kind::Quic] {
            let token = r.net.token_with(7, 0, 3, Limits::default(), 1_000);
            let moved = r.client(kind, 50 + kind as u8);
            assert!(
                bind_ok(&r.bind(&moved, &token)),
                "{kinds:?}: moved over {kind:?}"
            );
            let removed = r.net.token_with(7, 2, 3, Limits::default(), 1_000);
            let again = r.client(kind, 60 + kind as u8);
            assert_eq!(
                error_code(&r.bind(&again, &removed)),
                Some(ErrorCode::SessionClosed as u16),
                "{kinds:?}: the removed leg over {kind:?}"
            );
        }
        // Another session's tokens with the same expiry are not extended.
        let stranger = r.net.token_with(8, 0, 2, Limits::default(), 1_000);
        let c = r.client(Kind::Udp, 70);
        assert_eq!(
            error_code(&r.bind(&c, &stranger)),
            Some(ErrorCode::Expired as u16)
        );

        r.net
            .advance(Duration::from_millis(extended - T0_UNIX_MS - 21_000));
        let v = r.send(&clients[1], &rtp(2, 120));
        assert!(
            matches!(v, Verdict::Drop(DropReason::Expired)),
            "{kinds:?}: at the new expiry: {v:?}"
        );
    }
}

#[test]
fn every_transport_unbinds_idle_legs_and_evicts_on_drain() {
    for kinds in [UDP_ONLY, QUIC_ONLY, MIXED] {
        let (mut r, clients) = call(&kinds, 3_600_000);
        // The first client keeps alive; the others go quiet past the idle timeout.
        for _ in 0..11 {
            r.net.advance(Duration::from_secs(3));
            let c = clients[0];
            r.send(&c, &wire::keepalive([1; 8]));
            r.timeout();
        }
        for c in &clients[1..] {
            assert!(!r.table(c).serves(c.ep), "{kinds:?}: idle leg unbound");
        }
        assert!(r.table(&clients[0]).serves(clients[0].ep));
        for t in &mut r.tables {
            replies(t);
        }
        r.net.node.set_evicting(true);
        r.net.advance(Duration::from_millis(300));
        r.timeout();
        let c = clients[0];
        let out = replies(r.table(&c));
        assert_eq!(
            out.last().unwrap().msg.as_bytes(),
            wire::close(ErrorCode::Draining, 7).as_bytes()
        );
        assert_eq!(r.net.node.directory.legs(), 0);
    }
}

/// A BIND seen on the wire binds nothing on another transport: a captured UDP BIND (either
/// round) written on a QUIC stream is refused, a channel-bound BIND is refused over UDP, and a
/// QUIC BIND made for one connection does not verify on another.
#[test]
fn a_bind_proves_possession_only_for_the_transport_and_connection_it_was_made_for() {
    let mut r = Relay::new();
    let token = r.net.token(7, 0, 2);
    // The victim's UDP bind, both rounds, as an eavesdropper captures them.
    let victim = addr(20, 5000);
    let first = wire::bind(&token, [1; 8], None);
    r.tables[0].handle_datagram(r.net.now, victim, &first);
    let challenge = replies(&mut r.tables[0]);
    let RelayMessage::Challenge { cookie, .. } =
        wire::parse_relay(challenge[0].msg.as_bytes()).unwrap()
    else {
        panic!("challenge expected");
    };
    let second = wire::bind(&token, [2; 8], Some(cookie.try_into().unwrap()));
    let attacker = r.client(Kind::Quic, 66);
    for captured in [first, second] {
        let now = r.net.now;
        let v = r.table(&attacker).handle_stream_bind(
            now,
            attacker.ep,
            attacker.addr,
            &captured,
            &attacker.exporter,
        );
        assert!(matches!(v, Verdict::Drop(DropReason::BadBinding)));
        let out = replies(r.table(&attacker));
        assert_eq!(
            error_code(out[0].msg.as_bytes()),
            Some(ErrorCode::Unauthorized as u16)
        );
        assert!(out[0].msg.as_bytes().len() <= captured.len());
    }
    // As a QUIC datagram rather than on the stream: refused too.
    assert!(matches!(
        r.send(&attacker, &first),
        Verdict::Drop(DropReason::BadBinding)
    ));
    // A channel-bound BIND for connection A, replayed on connection B (another relay would see
    // the same): its tag does not cover B's exporter.
    let a = r.client(Kind::Quic, 30);
    let b = r.client(Kind::Quic, 31);
    let bound_to_a = wire::bind_channel(&token, [5; 8], &a.exporter);
    let now = r.net.now;
    let v = r
        .table(&b)
        .handle_stream_bind(now, b.ep, b.addr, &bound_to_a, &b.exporter);
    assert!(matches!(v, Verdict::Drop(DropReason::BadToken)));
    // And over UDP, from any source.
    assert!(matches!(
        r.tables[0].handle_datagram(r.net.now, victim, &bound_to_a),
        Verdict::Drop(DropReason::BadBinding)
    ));
    assert_eq!(r.net.node.directory.legs(), 0, "nothing bound");
    // The rightful holder on A binds.
    assert!(bind_ok(&r.bind(&a, &token)));
    let stats: Stats = r.tables.iter().fold(Stats::default(), |mut s, t| {
        s.merge(t.stats());
        s
    });
    assert_eq!(stats.drops_for(DropReason::BadBinding), 4);
}

/// A QUIC connection that moves gets no media until its new address answers a PROBE, so a
/// participant forging packets from a victim's address cannot have media sent there.
#[test]
fn a_migrated_quic_path_gets_no_media_until_it_answers_a_probe() {
    for kinds in [[Kind::Quic, Kind::Udp], [Kind::Quic, Kind::Quic]] {
        let (mut r, clients) = call(&kinds, 3_600_000);
        let (q, other) = (clients[0], clients[1]);
        let victim = addr(99, 7000);
        r.net.advance(Duration::from_millis(10));
        let now = r.net.now;
        r.table(&q).handle_path(now, q.ep, victim);
        let out = replies(r.table(&q));
        assert_eq!(out.len(), 1);
        assert!(!out[0].reliable);
        let RelayMessage::Probe { txn, cookie } = wire::parse_relay(out[0].msg.as_bytes()).unwrap()
        else {
            panic!("a PROBE is sent to the new path");
        };
        let cookie = cookie.to_vec();
        // Media toward the unproven path is withheld (the only target: nothing is forwarded).
        assert!(matches!(
            r.send(&other, &rtp(1, 200)),
            Verdict::Drop(DropReason::UnprovenPath)
        ));
        assert_eq!(
            r.table(&other).stats().drops_for(DropReason::UnprovenPath),
            1
        );
        // Media from it still flows (the participant could send it anyway).
        assert_eq!(targets(&r.send(&q, &rtp(2, 200))), vec![other.ep]);
        // PROBEs are bounded, whatever happens: at most 4 in all.
        let mut probes = 1;
        for _ in 0..20 {
            r.net.advance(Duration::from_millis(300));
            r.timeout();
            r.send(&q, &wire::keepalive([1; 8]));
            r.send(&other, &wire::keepalive([1; 8]));
            probes += replies(r.table(&q))
                .iter()
                .filter(|t| t.msg.as_bytes()[0] == wire::TYPE_PROBE)
                .count();
        }
        assert_eq!(probes, 4);
        // A forged echo proves nothing; the real one (from the probe the client received)
        // does, and media flows to the new path.
        let mut forged = cookie.clone();
        forged[20] ^= 1;
        assert!(matches!(
            r.send(&q, &wire::probe_ack(txn, &forged)),
            Verdict::Drop(DropReason::BadCookie)
        ));
        assert!(matches!(
            r.send(&q, &wire::probe_ack(txn, &cookie)),
            Verdict::Control
        ));
        assert_eq!(targets(&r.send(&other, &rtp(3, 200))), vec![q.ep]);
        // Moving back to the first address needs a new proof (only the last proven address is
        // remembered); returning to the proven one before answering needs none.
        let now = r.net.now;
        r.table(&q).handle_path(now, q.ep, q.addr);
        assert_eq!(replies(r.table(&q))[0].msg.as_bytes()[0], wire::TYPE_PROBE);
        assert!(matches!(
            r.send(&other, &rtp(4, 200)),
            Verdict::Drop(DropReason::UnprovenPath)
        ));
        r.table(&q).handle_path(now, q.ep, victim);
        assert!(replies(r.table(&q)).is_empty());
        assert_eq!(targets(&r.send(&other, &rtp(5, 200))), vec![q.ep]);
    }
}

/// Regression (found by the `datagram` fuzz target): the PROBE limit was per move, so a client
/// hopping between its proven address and a forged one had a PROBE sent to the victim at every
/// hop. Now at most 4 PROBEs leave between two answers, however the client moves.
#[test]
fn hopping_between_addresses_draws_at_most_four_probes_between_answers() {
    let (mut r, clients) = call(&[Kind::Quic, Kind::Udp], 3_600_000);
    let q = clients[0];
    let (victim, other_victim) = (addr(99, 7000), addr(98, 7000));
    let mut probes = Vec::new();
    for hop in 0..10 {
        r.net.advance(Duration::from_millis(10));
        let now = r.net.now;
        let to = match hop % 3 {
            0 => victim,
            1 => q.addr,
            _ => other_victim,
        };
        r.table(&q).handle_path(now, q.ep, to);
        r.timeout();
        probes.extend(
            replies(r.table(&q))
                .into_iter()
                .filter(|t| t.msg.as_bytes()[0] == wire::TYPE_PROBE),
        );
    }
    assert_eq!(probes.len(), 4, "four PROBEs in all, whatever the hops");
    // Spent: a move to yet another address draws nothing more.
    r.net.advance(Duration::from_millis(300));
    let now = r.net.now;
    r.table(&q).handle_path(now, q.ep, addr(97, 7000));
    r.timeout();
    assert!(replies(r.table(&q)).is_empty());
    // Back on its proven address, the client gets its media again, with no PROBE.
    r.table(&q).handle_path(now, q.ep, q.addr);
    assert!(replies(r.table(&q)).is_empty());
    let other = clients[1];
    assert_eq!(targets(&r.send(&other, &rtp(1, 200))), vec![q.ep]);
}

/// The IPv4-mapped form of an address, as a dual-stack socket reports an IPv4 peer.
fn mapped(a: SocketAddr) -> SocketAddr {
    let IpAddr::V4(v4) = a.ip() else {
        panic!("{a} is not IPv4")
    };
    SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port())
}

/// Regression (found by the `datagram` fuzz target): an address and its IPv4-mapped form are
/// one endpoint, as the cookies that prove a path count them. A report of the proven address in
/// its other form needed a new proof, and one of the address being proven started a new round
/// of PROBEs whose cookies the old ones also matched.
#[test]
fn an_address_and_its_ipv4_mapped_form_are_one_path() {
    let (mut r, clients) = call(&[Kind::Quic, Kind::Udp], 3_600_000);
    let (q, other) = (clients[0], clients[1]);
    r.net.advance(Duration::from_millis(10));
    let now = r.net.now;
    // The proven address in its mapped form: nothing to prove, media keeps flowing.
    r.table(&q).handle_path(now, q.ep, mapped(q.addr));
    assert!(
        replies(r.table(&q)).is_empty(),
        "no PROBE for the proven address"
    );
    assert_eq!(targets(&r.send(&other, &rtp(1, 200))), vec![q.ep]);
    // A move to a new address, then a report of that address in its other form: one PROBE, and
    // its echo proves the path.
    let to = addr(99, 7000);
    r.table(&q).handle_path(now, q.ep, mapped(to));
    let out = replies(r.table(&q));
    assert_eq!(out.len(), 1);
    let RelayMessage::Probe { txn, cookie } = wire::parse_relay(out[0].msg.as_bytes()).unwrap()
    else {
        panic!("a PROBE is sent to the new path");
    };
    let cookie = cookie.to_vec();
    r.table(&q).handle_path(now, q.ep, to);
    assert!(
        replies(r.table(&q)).is_empty(),
        "one address, one round of PROBEs"
    );
    assert!(matches!(
        r.send(&other, &rtp(2, 200)),
        Verdict::Drop(DropReason::UnprovenPath)
    ));
    assert!(matches!(
        r.send(&q, &wire::probe_ack(txn, &cookie)),
        Verdict::Control
    ));
    assert_eq!(targets(&r.send(&other, &rtp(3, 200))), vec![q.ep]);
}
