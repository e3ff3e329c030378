//! The QUIC load generator: flows of two QUIC legs each (`veil-client`), media as QUIC
//! datagrams through the relay, on a single-threaded tokio runtime so that the generator stays
//! on its one core.
//!
//! Unlike the UDP generator, the receive time is when the client library hands the datagram
//! over (after QUIC decryption), not a kernel timestamp: QUIC's own processing at the receiver
//! is part of what QUIC costs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use veil_client::{Leg, LegConfig, LegSender, RelayInfo, Transport};
use veil_relay_core::KeyRing;

use crate::udpgen::{Cores, Load, MAX_PACKETS, Measured, Sample, histogram};
use crate::{packet, realtime_ns};

/// Datagrams sent per turn when sending as fast as possible.
const MAX_BURST: usize = 64;

struct RxState {
    s0: u64,
    received: u64,
    hist: Histogram<u64>,
}

/// Bound QUIC flows, ready to carry load.
#[derive(Debug)]
pub struct QuicFlows {
    senders: Vec<LegSender>,
    /// Kept so that the sending legs stay bound.
    _legs: Vec<Leg>,
    rx: Arc<Mutex<RxState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxState")
            .field("received", &self.received)
            .finish()
    }
}

impl Drop for QuicFlows {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl QuicFlows {
    /// Binds `n` flows (two QUIC legs each, one session per flow) on the relay at `udp`/`quic`
    /// with certificate fingerprint `sha256`, and waits until every leg's path carries
    /// datagrams of `size` bytes (path MTU discovery). Must run inside a tokio runtime.
    pub async fn bind(
        keys: &KeyRing,
        udp: SocketAddr,
        quic: SocketAddr,
        sha256: [u8; 32],
        n: usize,
        size: usize,
    ) -> anyhow::Result<Self> {
        let relay = RelayInfo {
            udp,
            quic: Some(quic),
            quic_cert_sha256: Some(sha256),
        };
        let rx = Arc::new(Mutex::new(RxState {
            s0: u64::MAX,
            received: 0,
            hist: histogram(),
        }));
        let mut senders = Vec::new();
        let mut legs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let session: u64 = rand::random();
            let mut pair = Vec::new();
            for leg in 0..2u8 {
                let token = crate::veil::token(keys, session, leg, 2);
                let cfg = LegConfig::new(
                    token.to_bytes().to_vec(),
                    vec![relay.clone()],
                    Transport::Quic,
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                );
                let l = tokio::time::timeout(Duration::from_secs(10), Leg::bind(cfg))
                    .await
                    .context("QUIC bind timed out")?
                    .context("QUIC bind")?;
                pair.push(l);
            }
            let receiver = pair.pop().context("two legs")?;
            let sender = pair.pop().context("two legs")?;
            for l in [&sender, &receiver] {
                let deadline = Instant::now() + Duration::from_secs(5);
                while l.max_datagram_size().unwrap_or(0) < size {
                    if Instant::now() > deadline {
                        bail!(
                            "QUIC path carries datagrams of {:?} bytes at most, not {size}",
                            l.max_datagram_size()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            senders.push(sender.sender());
            legs.push(sender);
            tasks.push(tokio::spawn(receive(receiver, rx.clone())));
        }
        Ok(Self {
            senders,
            _legs: legs,
            rx,
            tasks,
        })
    }

    /// Offers `load` (bursts are not supported over QUIC) and measures what arrives.
    pub async fn run(
        &self,
        load: &Load,
        relay_pid: Option<u32>,
        cores: Cores,
    ) -> anyhow::Result<Measured> {
        {
            let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.s0 = u64::MAX;
            rx.received = 0;
            rx.hist.reset();
        }
        let mut bufs: Vec<Vec<u8>> = (0..self.senders.len())
            .map(|i| {
                let mut b = vec![0u8; load.size];
                packet::init(&mut b, i as u32);
                b
            })
            .collect();
        let start = Instant::now();
        let window_start = start + load.warmup;
        let window_end = window_start + load.window;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (mut seq, mut next) = (0u64, 0usize);
        let mut in_window = false;
        let (mut s0, mut t0, mut sample0) = (0u64, start, None);
        let (s1, t1, sample1);
        loop {
            match load.rate_pps {
                Some(_) => {
                    tick.tick().await;
                }
                None => tokio::task::yield_now().await,
            }
            let now = Instant::now();
            if crate::stop_requested() {
                bail!("interrupted");
            }
            if !in_window && now >= window_start {
                in_window = true;
                s0 = seq;
                self.rx.lock().unwrap_or_else(|e| e.into_inner()).s0 = seq;
                t0 = now;
                sample0 = Some(Sample::take(relay_pid, cores)?);
            }
            if now >= window_end || seq >= MAX_PACKETS {
                (s1, t1) = (seq, now);
                sample1 = Sample::take(relay_pid, cores)?;
                break;
            }
            let due = match load.rate_pps {
                Some(r) => ((r as f64 * now.duration_since(start).as_secs_f64()) as u64)
                    .saturating_sub(seq),
                None => MAX_BURST as u64,
            };
            let stamp = realtime_ns();
            for _ in 0..due {
                let b = &mut bufs[next];
                packet::stamp(b, seq, stamp);
                seq += 1;
                // A datagram the connection cannot take (its send buffer full) is a loss.
                let _ = self.senders[next].send(b).await;
                next = (next + 1) % self.senders.len();
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        Measured::from_window(
            load.rate_pps,
            s1 - s0,
            rx.received,
            t1.duration_since(t0),
            &rx.hist,
            (sample0, sample1),
        )
    }
}

async fn receive(mut leg: Leg, rx: Arc<Mutex<RxState>>) {
    while let Some(r) = leg.recv().await {
        let Some((seq, sent)) = packet::read(&r.data) else {
            continue;
        };
        // The client stamps arrival on the monotonic clock; carry it over to the wall clock
        // the sender stamped with.
        let at = realtime_ns().saturating_sub(r.at.elapsed().as_nanos() as u64);
        let mut s = rx.lock().unwrap_or_else(|e| e.into_inner());
        if seq >= s.s0 {
            s.received += 1;
            let _ = s.hist.record(at.saturating_sub(sent).max(1));
        }
    }
}
