//! `cookie::Cookies::check` on arbitrary cookies, addresses, tickets and times: the relay's
//! stateless return-routability check, whose input (the cookie echoed in a BIND) is chosen by
//! whoever sends the BIND.
//!
//! Input: `now_ms (8) | lifetime_ms (4) | addr (kind (1), IPv4 (4) or IPv6 (16), port (2)) |
//! ticket_len (1) | ticket | cookie`.
//!
//! Asserts: no panic; a cookie is accepted only if it is exactly what this relay would mint for
//! that address (IPv4 and its IPv4-mapped IPv6 form are one address) and ticket at the time it
//! names, and that time is neither in the future nor older than the lifetime; and a genuine cookie
//! is accepted for exactly its lifetime, from its address, with its ticket, and nowhere else.

#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use veil_fuzz::Reader;
use veil_relay_core::cookie::{CookieError, Cookies};
use veil_relay_core::wire::COOKIE_LEN;

fn same_host(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let now_ms = r.u64();
    let lifetime_ms = u64::from(r.u32());
    let from = r.socket_addr();
    let ticket_len = usize::from(r.u8()) % 64;
    let ticket = r.bytes(ticket_len).to_vec();
    let cookie = r.rest();

    let cookies = Cookies::new(
        *veil_fuzz::COOKIE_SECRET,
        Duration::from_millis(lifetime_ms),
    );

    // Arbitrary cookies.
    if cookies.check(now_ms, from, &ticket, cookie).is_ok() {
        assert_eq!(cookie.len(), COOKIE_LEN);
        let issued = u64::from_be_bytes(cookie[..8].try_into().expect("24 bytes"));
        assert_eq!(
            &cookies.mint(issued, from, &ticket)[..],
            cookie,
            "forged cookie accepted"
        );
        assert!(issued <= now_ms && now_ms - issued <= lifetime_ms);
    }

    // A genuine cookie, minted at `issued`, presented at `now_ms`.
    let issued = now_ms.saturating_sub(u64::from(cookie.first().copied().unwrap_or(0)) * 100);
    let genuine = cookies.mint(issued, from, &ticket);
    let verdict = cookies.check(now_ms, from, &ticket, &genuine);
    if now_ms - issued <= lifetime_ms {
        assert_eq!(verdict, Ok(()));
    } else {
        assert_eq!(verdict, Err(CookieError::Expired));
    }
    if issued > 0 {
        assert_eq!(
            cookies.check(issued - 1, from, &ticket, &genuine),
            Err(CookieError::Expired),
            "a cookie from the future"
        );
    }
    // From another address, with another ticket, or from another relay: refused.
    let mut elsewhere = from;
    elsewhere.set_port(from.port().wrapping_add(1));
    assert!(!same_host(elsewhere, from));
    assert_eq!(
        cookies.check(issued, elsewhere, &ticket, &genuine),
        Err(CookieError::Mismatch)
    );
    let mut other_ticket = ticket.clone();
    other_ticket.push(0);
    assert_eq!(
        cookies.check(issued, from, &other_ticket, &genuine),
        Err(CookieError::Mismatch)
    );
    let other_relay = Cookies::new([0xEE; 32], Duration::from_millis(lifetime_ms));
    assert_eq!(
        other_relay.check(issued, from, &ticket, &genuine),
        Err(CookieError::Mismatch)
    );
});
