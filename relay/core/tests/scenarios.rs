//! Scenarios of the packet path in virtual time, on the shared harness (`veil-testkit`): no
//! sockets, no sleeps. `transports.rs` runs the same scenarios for UDP-only, QUIC-only and mixed
//! sessions.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use veil_relay_core::token::{Limits, TICKET_LEN, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, ErrorCode, RelayMessage};
use veil_relay_core::{
    BindResult, Config, DropReason, Endpoint, Event, ForwardingTable, KeyRing, LegStatus,
    SessionId, Verdict,
};
use veil_testkit::{Net, T0_UNIX_MS, addr, replies, rtp, targets};

/// Runs the two-round bind for `token` from `from`; returns the final answer.
fn bind(net: &Net, r: &mut ForwardingTable, from: SocketAddr, token: &Token) -> Vec<u8> {
    veil_testkit::udp_bind(r, net.now, from, token)
}

fn is_bind_ok(b: &[u8]) -> bool {
    matches!(wire::parse_relay(b), Ok(RelayMessage::BindOk { txn, idle_timeout_secs: 30 }) if txn == [2; 8])
}

fn error_code(b: &[u8]) -> Option<u16> {
    match wire::parse_relay(b) {
        Ok(RelayMessage::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[test]
fn two_party_call_binds_and_forwards_both_ways() {
    let net = Net::new();
    let mut r = net.worker();
    let (a, b) = (addr(2, 4000), addr(3, 4000));
    assert!(is_bind_ok(&bind(&net, &mut r, a, &net.token(7, 0, 2))));
    // Alone in the session: nothing to forward to.
    assert!(matches!(
        r.handle_datagram(net.now, a, &rtp(1, 100)),
        Verdict::Drop(DropReason::NoPeer)
    ));
    assert!(is_bind_ok(&bind(&net, &mut r, b, &net.token(7, 1, 2))));
    assert_eq!(
        targets(&r.handle_datagram(net.now, a, &rtp(2, 100))),
        vec![Endpoint::Udp(b)]
    );
    assert_eq!(
        targets(&r.handle_datagram(net.now, b, &rtp(1, 100))),
        vec![Endpoint::Udp(a)]
    );
    // SRTCP and DTLS go the same way.
    let mut rtcp = rtp(0, 40);
    rtcp[1] = 200;
    assert_eq!(
        targets(&r.handle_datagram(net.now, a, &rtcp)),
        vec![Endpoint::Udp(b)]
    );
    let mut dtls = vec![22u8; 60];
    dtls[1] = 0xfe;
    assert_eq!(
        targets(&r.handle_datagram(net.now, b, &dtls)),
        vec![Endpoint::Udp(a)]
    );
    // Too short for its class, or not media at all: dropped.
    assert!(matches!(
        r.handle_datagram(net.now, a, &rtp(0, 11)),
        Verdict::Drop(DropReason::Malformed)
    ));
    assert!(matches!(
        r.handle_datagram(net.now, a, &[22u8; 12]),
        Verdict::Drop(DropReason::Malformed)
    ));
    for first in [0u8, 1, 17, 64, 79, 200, 255] {
        let v = r.handle_datagram(net.now, a, &[first; 100]);
        assert!(
            matches!(v, Verdict::Drop(DropReason::UnknownType)),
            "first byte {first}"
        );
    }
    let s = r.stats();
    assert_eq!(s.forwarded_packets, 4);
    assert_eq!(s.forwarded_bytes, 100 + 100 + 40 + 60);
    assert_eq!(s.binds_for(BindResult::Bound), 2);
    assert_eq!(s.binds_for(BindResult::Challenged), 2);
    assert_eq!(net.node.directory.legs(), 2);
}

#[test]
fn legs_on_different_workers_reach_each_other() {
    let net = Net::new();
    let (mut w1, mut w2) = (net.worker(), net.worker());
    let (a, b, c) = (addr(2, 1), addr(3, 1), addr(4, 1));
    assert!(is_bind_ok(&bind(&net, &mut w1, a, &net.token(7, 0, 3))));
    assert!(is_bind_ok(&bind(&net, &mut w2, b, &net.token(7, 1, 3))));
    assert!(is_bind_ok(&bind(&net, &mut w2, c, &net.token(7, 2, 3))));
    let mut from_a = targets(&w1.handle_datagram(net.now, a, &rtp(1, 50)));
    from_a.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(from_a, vec![Endpoint::Udp(b), Endpoint::Udp(c)]);
    let mut from_b = targets(&w2.handle_datagram(net.now, b, &rtp(1, 50)));
    from_b.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(from_b, vec![Endpoint::Udp(a), Endpoint::Udp(c)]);
    // A worker that does not hold a leg does not forward for it.
    assert!(matches!(
        w1.handle_datagram(net.now, b, &rtp(2, 50)),
        Verdict::Drop(DropReason::Unbound)
    ));
}

#[test]
fn sixteen_legs_fan_out_to_fifteen() {
    let net = Net::new();
    let mut r = net.worker();
    for leg in 0..16u8 {
        assert!(is_bind_ok(&bind(
            &net,
            &mut r,
            addr(10 + leg, 9),
            &net.token(1, leg, 16)
        )));
    }
    let t = targets(&r.handle_datagram(net.now, addr(10, 9), &rtp(1, 200)));
    assert_eq!(t.len(), 15);
    assert!(!t.contains(&Endpoint::Udp(addr(10, 9))));
}

#[test]
fn bad_tokens_bind_nothing_and_answers_never_exceed_requests() {
    let mut net = Net::new();
    let mut r = net.worker();
    let a = addr(2, 1);
    let good = net.token(7, 0, 2);

    // Forged: a ticket byte changed, the leg key kept.
    let mut forged_bytes = good.to_bytes();
    forged_bytes[11] ^= 1; // session id
    let forged = Token::from_bytes(&forged_bytes).unwrap();
    // Signed with a key the relay does not hold.
    let stranger = KeyRing::from_keys(&[(9, [5; 32])], 9).mint(*good.claims());
    // Same key id as the ring's, different secret.
    let impostor = KeyRing::from_keys(&[(2, [5; 32])], 2).mint(*good.claims());
    // Expired.
    let expired = net.token_with(7, 0, 2, Limits::default(), 1_000);

    for (token, code, reason) in [
        (&forged, ErrorCode::Unauthorized, DropReason::BadToken),
        (&stranger, ErrorCode::Unauthorized, DropReason::UnknownKey),
        (&impostor, ErrorCode::Unauthorized, DropReason::BadToken),
    ] {
        let msg = wire::bind(token, [1; 8], None);
        assert!(matches!(r.handle_datagram(net.now, a, &msg), Verdict::Drop(x) if x == reason));
        let out = replies(&mut r);
        assert_eq!(error_code(out[0].msg.as_bytes()), Some(code as u16));
        assert!(out[0].msg.as_bytes().len() <= msg.len());
    }
    net.advance(Duration::from_secs(2));
    let msg = wire::bind(&expired, [1; 8], None);
    assert!(matches!(
        r.handle_datagram(net.now, a, &msg),
        Verdict::Drop(DropReason::Expired)
    ));
    assert_eq!(
        error_code(replies(&mut r)[0].msg.as_bytes()),
        Some(ErrorCode::Expired as u16)
    );

    // A leg key that does not match its ticket (a token for another session, spliced).
    let other = net.token(8, 0, 2);
    let mut spliced = other.to_bytes();
    spliced[TICKET_LEN..].copy_from_slice(&good.to_bytes()[TICKET_LEN..]);
    let spliced = Token::from_bytes(&spliced).unwrap();
    r.handle_datagram(net.now, a, &wire::bind(&spliced, [1; 8], None));
    assert_eq!(
        error_code(replies(&mut r)[0].msg.as_bytes()),
        Some(ErrorCode::Unauthorized as u16)
    );

    assert_eq!(net.node.directory.legs(), 0);
    assert_eq!(r.local_legs(), 0);
    assert!(matches!(
        r.handle_datagram(net.now, a, &rtp(1, 100)),
        Verdict::Drop(DropReason::Unbound)
    ));
    assert_eq!(r.stats().forwarded_packets, 0);
}

#[test]
fn cookie_lifetime_is_configurable() {
    let mut net = Net::with_config(
        Config {
            cookie_lifetime: Duration::from_millis(300),
            ..Config::default()
        },
        10,
    );
    let mut r = net.worker();
    let client = addr(2, 1);
    let token = net.token(7, 0, 2);
    r.handle_datagram(net.now, client, &wire::bind(&token, [1; 8], None));
    let out = replies(&mut r);
    let Ok(RelayMessage::Challenge { cookie, .. }) = wire::parse_relay(out[0].msg.as_bytes())
    else {
        panic!("a challenge")
    };
    let cookie: [u8; COOKIE_LEN] = cookie.try_into().unwrap();
    let second = wire::bind(&token, [2; 8], Some(&cookie));
    // Past the configured lifetime (well within the default 10 s): a fresh challenge, no leg.
    net.advance(Duration::from_millis(301));
    r.handle_datagram(net.now, client, &second);
    assert!(matches!(
        wire::parse_relay(replies(&mut r)[0].msg.as_bytes()),
        Ok(RelayMessage::Challenge { .. })
    ));
    assert_eq!(net.node.directory.legs(), 0);
    assert_eq!(r.stats().drops_for(DropReason::BadCookie), 1);
    // Within it, the same cookie binds.
    r.handle_datagram(net.now, client, &wire::bind(&token, [3; 8], None));
    let out = replies(&mut r);
    let Ok(RelayMessage::Challenge { cookie, .. }) = wire::parse_relay(out[0].msg.as_bytes())
    else {
        panic!("a challenge")
    };
    let cookie: [u8; COOKIE_LEN] = cookie.try_into().unwrap();
    net.advance(Duration::from_millis(300));
    r.handle_datagram(net.now, client, &wire::bind(&token, [2; 8], Some(&cookie)));
    assert!(is_bind_ok(replies(&mut r)[0].msg.as_bytes()));
    assert_eq!(net.node.directory.legs(), 1);
}

#[test]
fn cookies_prove_the_source_address() {
    let mut net = Net::new();
    let mut r = net.worker();
    let (client, attacker) = (addr(2, 1), addr(66, 6));
    let token = net.token(7, 0, 2);
    r.handle_datagram(net.now, client, &wire::bind(&token, [1; 8], None));
    let out = replies(&mut r);
    let Ok(RelayMessage::Challenge { cookie, .. }) = wire::parse_relay(out[0].msg.as_bytes())
    else {
        panic!()
    };
    let cookie: [u8; COOKIE_LEN] = cookie.try_into().unwrap();
    let second = wire::bind(&token, [2; 8], Some(&cookie));

    // The completed bind, replayed from another address: not bound; the replayer only gets a
    // fresh challenge for its own address, smaller than what it sent.
    assert!(matches!(
        r.handle_datagram(net.now, attacker, &second),
        Verdict::Control
    ));
    let out = replies(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst, attacker);
    assert!(matches!(
        wire::parse_relay(out[0].msg.as_bytes()),
        Ok(RelayMessage::Challenge { .. })
    ));
    assert!(out[0].msg.as_bytes().len() < second.len());
    assert_eq!(net.node.directory.legs(), 0);
    assert_eq!(r.stats().drops_for(DropReason::BadCookie), 1);

    // The cookie expires after its lifetime.
    net.advance(Duration::from_secs(11));
    r.handle_datagram(net.now, client, &second);
    assert!(matches!(
        wire::parse_relay(replies(&mut r)[0].msg.as_bytes()),
        Ok(RelayMessage::Challenge { .. })
    ));
    assert_eq!(net.node.directory.legs(), 0);

    // The rightful client, echoing a fresh cookie, binds.
    assert!(is_bind_ok(&bind(&net, &mut r, client, &token)));
    // A bind replayed from elsewhere does not move the leg.
    r.handle_datagram(net.now, attacker, &second);
    replies(&mut r);
    assert_eq!(
        net.node.directory.legs(),
        1,
        "still one leg, still at the client's address"
    );
    assert!(r.serves(client.into()) && !r.serves(attacker.into()));
}

#[test]
fn release_stops_forwarding_at_the_next_packet_and_refuses_rebinds() {
    let mut net = Net::new();
    let mut r = net.worker();
    let (a, b) = (addr(2, 1), addr(3, 1));
    let ta = net.token(7, 0, 2);
    bind(&net, &mut r, a, &ta);
    bind(&net, &mut r, b, &net.token(7, 1, 2));
    assert_eq!(
        targets(&r.handle_datagram(net.now, a, &rtp(1, 100))).len(),
        1
    );

    let eps = net.node.revoke(SessionId(7), T0_UNIX_MS + 3_600_000);
    assert_eq!(eps.len(), 2);
    assert!(matches!(
        r.handle_datagram(net.now, a, &rtp(2, 100)),
        Verdict::Drop(DropReason::SessionClosed)
    ));
    let out = replies(&mut r);
    assert_eq!(out[0].dst, a);
    assert!(matches!(
        wire::parse_relay(out[0].msg.as_bytes()),
        Ok(RelayMessage::Close {
            code: 4,
            session: 7
        })
    ));
    // The other leg learns at the next sweep.
    net.advance(Duration::from_millis(300));
    r.handle_timeout(net.now);
    let out = replies(&mut r);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst, b);
    assert_eq!(r.local_legs(), 0);
    assert!(matches!(
        r.handle_datagram(net.now, b, &rtp(2, 100)),
        Verdict::Drop(DropReason::Unbound)
    ));
    // The token no longer binds.
    r.handle_datagram(net.now, a, &wire::bind(&ta, [1; 8], None));
    assert_eq!(
        error_code(replies(&mut r)[0].msg.as_bytes()),
        Some(ErrorCode::SessionClosed as u16)
    );
}

#[test]
fn idle_legs_expire_and_keepalives_keep_them() {
    let mut net = Net::new();
    let mut r = net.worker();
    let (a, b) = (addr(2, 1), addr(3, 1));
    bind(&net, &mut r, a, &net.token(7, 0, 2));
    bind(&net, &mut r, b, &net.token(7, 1, 2));
    for _ in 0..40 {
        net.advance(Duration::from_secs(1));
        assert!(matches!(
            r.handle_datagram(net.now, a, &wire::keepalive([3; 8])),
            Verdict::Control
        ));
        r.handle_timeout(net.now);
    }
    let acks = replies(&mut r);
    assert_eq!(acks.len(), 40);
    assert!(
        acks.iter()
            .all(|t| t.dst == a && t.msg.as_bytes() == wire::keepalive_ack([3; 8]).as_bytes())
    );
    // b sent nothing for 40 s: unbound; a kept alive.
    assert_eq!(r.local_legs(), 1);
    assert_eq!(net.node.directory.legs(), 1);
    assert!(matches!(
        r.handle_datagram(net.now, a, &rtp(1, 100)),
        Verdict::Drop(DropReason::NoPeer)
    ));
    // A KEEPALIVE from an address with no leg is answered NOT_BOUND, no longer than itself.
    let ka = wire::keepalive([4; 8]);
    assert!(matches!(
        r.handle_datagram(net.now, b, &ka),
        Verdict::Drop(DropReason::Unbound)
    ));
    let out = replies(&mut r);
    assert_eq!(
        error_code(out[0].msg.as_bytes()),
        Some(ErrorCode::NotBound as u16)
    );
    assert_eq!(out[0].msg.as_bytes().len(), ka.len());
}

#[test]
fn token_expiry_ends_the_leg_with_a_close() {
    let mut net = Net::new();
    let mut r = net.worker();
    let a = addr(2, 1);
    bind(
        &net,
        &mut r,
        a,
        &net.token_with(7, 0, 2, Limits::default(), 5_000),
    );
    net.advance(Duration::from_secs(4));
    r.handle_timeout(net.now);
    assert_eq!(r.local_legs(), 1);
    net.advance(Duration::from_secs(1));
    r.handle_timeout(net.now);
    assert_eq!(r.local_legs(), 0);
    assert_eq!(net.node.directory.legs(), 0);
    let out = replies(&mut r);
    assert!(matches!(
        wire::parse_relay(out[0].msg.as_bytes()),
        Ok(RelayMessage::Close {
            code: 3,
            session: 7
        })
    ));
}

#[test]
fn a_leg_that_moves_is_forwarded_to_at_its_new_address_only() {
    let net = Net::new();
    let (mut w1, mut w2) = (net.worker(), net.worker());
    let (a, a2, b) = (addr(2, 1), addr(2, 2), addr(3, 1));
    let ta = net.token(7, 0, 2);
    bind(&net, &mut w1, a, &ta);
    bind(&net, &mut w1, b, &net.token(7, 1, 2));
    // a's NAT rebinds it to a new port, which the kernel hashes to the other worker.
    assert!(is_bind_ok(&bind(&net, &mut w2, a2, &ta)));
    assert_eq!(net.node.directory.legs(), 2);
    assert_eq!(
        targets(&w1.handle_datagram(net.now, b, &rtp(1, 80))),
        vec![Endpoint::Udp(a2)]
    );
    assert_eq!(
        targets(&w2.handle_datagram(net.now, a2, &rtp(1, 80))),
        vec![Endpoint::Udp(b)]
    );
    // The old address no longer sends into the call.
    assert!(matches!(
        w1.handle_datagram(net.now, a, &rtp(2, 80)),
        Verdict::Drop(DropReason::Unbound)
    ));
    assert!(!w1.serves(a.into()));
}

/// Regression (found by the `datagram` fuzz target): a worker acknowledged KEEPALIVEs from a leg
/// whose session had been released, or that had been bound elsewhere through another worker,
/// until its next sweep, telling the client that the relay still served it.
#[test]
fn keepalives_from_a_released_or_moved_leg_are_not_acknowledged() {
    let net = Net::new();
    let (mut w1, mut w2) = (net.worker(), net.worker());
    let (a, a2, b) = (addr(2, 1), addr(2, 2), addr(3, 1));
    let ta = net.token(7, 0, 2);
    bind(&net, &mut w1, a, &ta);
    bind(&net, &mut w1, b, &net.token(7, 1, 2));
    expect_ack(&net, &mut w1, a);

    // The leg moves to a2, which the kernel hashes to the other worker: w1 has not swept yet.
    assert!(is_bind_ok(&bind(&net, &mut w2, a2, &ta)));
    let ka = wire::keepalive([5; 8]);
    assert!(matches!(
        w1.handle_datagram(net.now, a, &ka),
        Verdict::Drop(DropReason::Unbound)
    ));
    let out = replies(&mut w1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst, a);
    assert_eq!(
        error_code(out[0].msg.as_bytes()),
        Some(ErrorCode::NotBound as u16)
    );
    assert!(!w1.serves(a.into()));
    assert!(std::iter::from_fn(|| w1.poll_event()).any(|e| matches!(
        e,
        Event::Unbound {
            why: LegStatus::Moved,
            endpoint,
            ..
        } if endpoint == a
    )));
    expect_ack(&net, &mut w2, a2);

    // The session is released: the next KEEPALIVE gets CLOSE, no longer than itself.
    net.node.revoke(SessionId(7), T0_UNIX_MS + 3_600_000);
    assert!(matches!(
        w1.handle_datagram(net.now, b, &ka),
        Verdict::Drop(DropReason::SessionClosed)
    ));
    let out = replies(&mut w1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst, b);
    assert_eq!(out[0].msg.as_bytes().len(), ka.len());
    assert!(matches!(
        wire::parse_relay(out[0].msg.as_bytes()),
        Ok(RelayMessage::Close {
            code: 4,
            session: 7
        })
    ));
    assert_eq!(w1.local_legs(), 0);
    assert_eq!(w1.stats().drops_for(DropReason::SessionClosed), 1);
    // From then on, the address holds no leg.
    w1.handle_datagram(net.now, b, &ka);
    assert_eq!(
        error_code(replies(&mut w1)[0].msg.as_bytes()),
        Some(ErrorCode::NotBound as u16)
    );
}

/// Sends a KEEPALIVE from `from` and expects KEEPALIVE_ACK.
fn expect_ack(net: &Net, r: &mut ForwardingTable, from: SocketAddr) {
    let ka = wire::keepalive([4; 8]);
    assert!(matches!(
        r.handle_datagram(net.now, from, &ka),
        Verdict::Control
    ));
    let out = replies(r);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].msg.as_bytes(),
        wire::keepalive_ack([4; 8]).as_bytes()
    );
}

#[test]
fn rate_limits_from_the_ticket_are_enforced() {
    let mut net = Net::new();
    let mut r = net.worker();
    let (a, b) = (addr(2, 1), addr(3, 1));
    bind(
        &net,
        &mut r,
        a,
        &net.token_with(
            7,
            0,
            2,
            Limits {
                max_pps: 50,
                max_kbps: 0,
            },
            3_600_000,
        ),
    );
    bind(&net, &mut r, b, &net.token(7, 1, 2));
    let mut forwarded = 0;
    for i in 0..1_000u16 {
        // 500 pps offered for 2 s against a 50 pps limit with a one-second burst.
        net.advance(Duration::from_millis(2));
        if matches!(
            r.handle_datagram(net.now, a, &rtp(i, 100)),
            Verdict::Forward(_)
        ) {
            forwarded += 1;
        }
    }
    assert!((145..=155).contains(&forwarded), "{forwarded}");
    assert_eq!(
        r.stats().drops_for(DropReason::RateLimited),
        1_000 - forwarded
    );
}

#[test]
fn capacity_and_drain_refuse_with_clear_codes() {
    let net = Net::with_capacity(1);
    let mut r = net.worker();
    assert!(is_bind_ok(&bind(
        &net,
        &mut r,
        addr(2, 1),
        &net.token(7, 0, 2)
    )));
    let refused = bind(&net, &mut r, addr(3, 1), &net.token(7, 1, 2));
    assert_eq!(error_code(&refused), Some(ErrorCode::RelayFull as u16));
    net.node.directory.set_draining(true);
    let refused = bind(&net, &mut r, addr(4, 1), &net.token(8, 0, 2));
    assert_eq!(error_code(&refused), Some(ErrorCode::Draining as u16));
}

#[test]
fn one_address_holds_one_leg() {
    let net = Net::new();
    let mut r = net.worker();
    let a = addr(2, 1);
    bind(&net, &mut r, a, &net.token(7, 0, 2));
    bind(&net, &mut r, a, &net.token(8, 0, 2));
    assert_eq!(net.node.directory.legs(), 1);
    assert_eq!(net.node.directory.sessions(), 1);
    // The address now holds session 8's leg: its peer's media reaches it.
    let b = addr(3, 1);
    bind(&net, &mut r, b, &net.token(8, 1, 2));
    assert_eq!(
        targets(&r.handle_datagram(net.now, b, &rtp(1, 100))),
        vec![Endpoint::Udp(a)]
    );
}

#[test]
fn random_datagrams_from_unbound_sources_forward_nothing_and_never_amplify() {
    let net = Net::new();
    let mut r = net.worker();
    // A real call in progress, to make sure nothing leaks into it.
    bind(&net, &mut r, addr(2, 1), &net.token(7, 0, 2));
    bind(&net, &mut r, addr(3, 1), &net.token(7, 1, 2));
    let baseline = *r.stats();
    let mut rng = StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; 1500];
    let (mut rx_bytes, mut tx_bytes) = (0usize, 0usize);
    for i in 0..200_000usize {
        let len = i % 1501;
        rng.fill(&mut buf[..len]);
        // Bias the first byte towards the interesting ranges.
        if len > 0 && i % 3 == 0 {
            buf[0] = [0x50, 0x53, 0x80, 0x16][i % 4];
        }
        let from = SocketAddr::from(([127, 0, (i >> 8) as u8, i as u8], 1000 + (i % 7) as u16));
        let v = r.handle_datagram(net.now, from, &buf[..len]);
        assert!(!matches!(v, Verdict::Forward(_)));
        rx_bytes += len;
        for t in replies(&mut r) {
            assert_eq!(t.dst, from);
            assert!(
                t.msg.as_bytes().len() <= len,
                "{} byte answer to {len} bytes",
                t.msg.as_bytes().len()
            );
            tx_bytes += t.msg.as_bytes().len();
        }
    }
    assert_eq!(r.stats().forwarded_packets, baseline.forwarded_packets);
    assert_eq!(net.node.directory.legs(), 2);
    assert!(tx_bytes <= rx_bytes);
    assert_eq!(r.stats().rx_packets - baseline.rx_packets, 200_000);
    // Every one of them was dropped, and counted.
    assert_eq!(r.stats().total_drops() - baseline.total_drops(), 200_000);
}

#[test]
fn the_virtual_clock_drives_wall_time() {
    let mut net = Net::new();
    assert_eq!(net.node.unix_ms(net.now), T0_UNIX_MS);
    net.advance(Duration::from_millis(1_500));
    assert_eq!(net.node.unix_ms(net.now), T0_UNIX_MS + 1_500);
    net.node.set_wall_clock(net.now, T0_UNIX_MS + 10_000);
    assert_eq!(net.node.unix_ms(net.now), T0_UNIX_MS + 10_000);
    assert!(net.now >= net.t0);
}

#[test]
fn eviction_tells_every_leg_to_move_and_unbinds_it() {
    let mut net = Net::new();
    let mut r = net.worker();
    let (a, b) = (addr(2, 1), addr(3, 1));
    bind(&net, &mut r, a, &net.token(7, 0, 2));
    bind(&net, &mut r, b, &net.token(7, 1, 2));
    net.node.directory.set_draining(true);
    net.advance(Duration::from_millis(300));
    r.handle_timeout(net.now);
    assert_eq!(r.local_legs(), 2, "draining alone keeps calls");
    net.node.set_evicting(true);
    net.advance(Duration::from_millis(300));
    r.handle_timeout(net.now);
    assert_eq!((r.local_legs(), net.node.directory.legs()), (0, 0));
    let mut got: Vec<_> = replies(&mut r)
        .iter()
        .map(|t| (t.dst, t.msg.as_bytes().to_vec()))
        .collect();
    got.sort_by_key(|(d, _)| format!("{d:?}"));
    let close = wire::close(ErrorCode::Draining, 7);
    assert_eq!(
        got,
        vec![
            (Endpoint::Udp(a), close.as_bytes().to_vec()),
            (Endpoint::Udp(b), close.as_bytes().to_vec())
        ]
    );
}
