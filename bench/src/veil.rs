//! Veil's side of the benchmark: a cluster key file, leg tokens minted from it (as a controller
//! would), `veil-relay` processes, and the UDP bind exchange.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use veil_relay_core::token::{KeyId, Limits, SessionId, Ticket, Token};
use veil_relay_core::wire::{self, COOKIE_LEN, RelayMessage};
use veil_relay_core::{KeyRing, wire::ErrorCode};

use crate::proc::{Service, free_tcp_port, free_udp_port, pinned, sibling, wait_until};

/// Per-leg limits the benchmark's tokens carry: far above any rate offered, so nothing is
/// dropped, but not zero, so the relay runs its rate limiter on every packet as it does for
/// tokens a controller mints (whose default is 5,000 pps and 50 Mbit/s).
pub const BENCH_LIMITS: Limits = Limits {
    max_pps: 100_000_000,
    max_kbps: 4_000_000_000,
};

/// Writes a fresh one-key ring to `dir/keys.txt`.
pub fn write_key_file(dir: &Path) -> anyhow::Result<(KeyRing, PathBuf)> {
    let keys = KeyRing::from_keys(&[(1, rand::random())], 1);
    let path = dir.join("keys.txt");
    std::fs::write(&path, keys.to_file_format())?;
    // Reads it back, as a generator given only the file would.
    let text = std::fs::read_to_string(&path)?;
    Ok((KeyRing::parse(&text).context("key file")?, path))
}

/// Mints a token for leg `leg` of `legs` in `session`, valid for an hour.
pub fn token(keys: &KeyRing, session: u64, leg: u8, legs: u8) -> Token {
    keys.mint(Ticket {
        key_id: KeyId(0),
        session: SessionId(session),
        leg,
        legs,
        expires_unix_ms: crate::realtime_ns() / 1_000_000 + 3_600_000,
        limits: BENCH_LIMITS,
    })
}

/// Runs the UDP bind exchange (BIND, CHALLENGE, BIND with the cookie, BIND_OK) for `token` from
/// `sock` to `relay`, retrying every 200 ms for 3 s.
pub fn bind_udp(sock: &UdpSocket, relay: SocketAddr, token: &Token) -> anyhow::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let txn: [u8; 8] = rand::random();
    let mut cookie: Option<[u8; COOKIE_LEN]> = None;
    let mut buf = [0u8; 1500];
    for _ in 0..15 {
        sock.send_to(&wire::bind(token, txn, cookie.as_ref()), relay)?;
        loop {
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if from != relay {
                continue;
            }
            match wire::parse_relay(&buf[..n]) {
                Ok(RelayMessage::Challenge { txn: t, cookie: c }) if t == txn => {
                    cookie = Some(c.try_into().context("cookie length")?);
                    break;
                }
                Ok(RelayMessage::BindOk { txn: t, .. }) if t == txn => return Ok(()),
                Ok(RelayMessage::Error { txn: t, code }) if t == txn => {
                    bail!("relay refused the bind: {:?}", ErrorCode::from_u16(code));
                }
                _ => {}
            }
        }
    }
    bail!("no BIND_OK from {relay}")
}

/// A QUIC identity for a relay: PEM files and the fingerprint clients pin.
#[derive(Debug)]
pub struct QuicIdentity {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
    /// SHA-256 of the certificate (DER).
    pub sha256: [u8; 32],
}

/// Generates a self-signed certificate into `dir`.
pub fn quic_identity(dir: &Path) -> anyhow::Result<QuicIdentity> {
    let ck = rcgen::generate_simple_self_signed(vec!["veil-relay".to_string()])?;
    let cert = dir.join("relay.crt");
    let key = dir.join("relay.key");
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    Ok(QuicIdentity {
        cert,
        key,
        sha256: Sha256::digest(ck.cert.der()).into(),
    })
}

/// A `veil-relay` process.
#[derive(Debug)]
pub struct RelayProcess {
    /// The process.
    pub service: Service,
    /// Its UDP media address.
    pub udp: SocketAddr,
    /// Its QUIC address, if it serves QUIC.
    pub quic: Option<SocketAddr>,
}

/// Starts a release `veil-relay` pinned to `core`: one UDP IO worker, on loopback, standalone
/// (no controller), stopping at once on SIGTERM; QUIC too if `quic` is given. `extra` flags are
/// appended.
pub fn start_relay(
    dir: &Path,
    key_file: &Path,
    core: usize,
    quic: Option<&QuicIdentity>,
    extra: &[String],
) -> anyhow::Result<RelayProcess> {
    let udp: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
    let mut cmd = pinned(core, sibling("veil-relay")?);
    cmd.args(["--key-file".as_ref(), key_file.as_os_str()])
        .args(["--udp-addr", &udp.to_string()])
        .args(["--ops-addr", &format!("127.0.0.1:{}", free_tcp_port()?)])
        .args(["--workers", "1"])
        .args(["--drain-deadline-secs", "0", "--log-filter", "warn"])
        .args(extra);
    if !extra.iter().any(|a| a == "--node-id") {
        cmd.args(["--node-id", "bench-relay"]);
    }
    let quic_addr = match quic {
        Some(id) => {
            let a: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
            cmd.args(["--quic-addr", &a.to_string()])
                .args(["--quic-cert-file".as_ref(), id.cert.as_os_str()])
                .args(["--quic-key-file".as_ref(), id.key.as_os_str()]);
            Some(a)
        }
        None => None,
    };
    let mut service = Service::spawn("veil-relay", cmd, &dir.join("relay.log"))?;
    wait_until(&mut service, Duration::from_secs(10), || probe_udp(udp))?;
    Ok(RelayProcess {
        service,
        udp,
        quic: quic_addr,
    })
}

/// Sends a KEEPALIVE from a fresh socket: a serving relay answers ERROR `NOT_BOUND`.
pub fn probe_udp(relay: SocketAddr) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    sock.send_to(&wire::keepalive(rand::random()), relay)?;
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf)?;
    match wire::parse_relay(&buf[..n]) {
        Ok(RelayMessage::Error { .. }) => Ok(()),
        _ => bail!("unexpected answer to a KEEPALIVE"),
    }
}
