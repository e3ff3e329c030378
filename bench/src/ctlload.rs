//! Load on the controller's `AllocateSession`: closed-loop (many requests in flight, as fast as
//! the controller answers) for throughput, and open-loop (a fixed rate, whatever the answers
//! do) for latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::Channel;
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;

use crate::cpu;

/// Most requests one run issues, whatever its rate and window: a bound on every load loop.
pub const MAX_REQUESTS: u64 = 2_000_000;

/// Connects `n` separate HTTP/2 connections to `url`.
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<SessionServiceClient<Channel>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {url}"))?;
        out.push(SessionServiceClient::new(ch));
    }
    Ok(out)
}

/// A two-party allocation with a call id unique to this process.
pub fn request(tag: &str, i: u64) -> pb::AllocateSessionRequest {
    let participant = |id: &str| pb::Participant {
        participant_id: id.to_string(),
        region: String::new(),
        preferred_transport: pb::Transport::Udp as i32,
    };
    pb::AllocateSessionRequest {
        call_id: format!("bench-{}-{tag}-{i}", std::process::id()),
        participants: vec![participant("alice"), participant("bob")],
        ttl_seconds: 60,
    }
}

/// Allocates until the answer names two relays (primary and backup: both relays attached), for
/// at most `timeout`.
pub async fn wait_for_relays(
    client: &mut SessionServiceClient<Channel>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut i = 0;
    loop {
        i += 1;
        let r = client.allocate_session(request("ready", i)).await;
        if let Ok(r) = &r
            && r.get_ref()
                .session
                .as_ref()
                .is_some_and(|s| s.relays.len() == 2)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("controller did not place sessions on two relays in {timeout:?}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a closed-loop run measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Requests in flight.
    pub concurrency: usize,
    /// Successful allocations per second.
    pub per_sec: f64,
    /// Failed requests in the window.
    pub errors: u64,
    /// Controller CPU microseconds per allocation.
    pub ctl_us_per_alloc: f64,
    /// Controller CPU use, fraction of a core.
    pub ctl_util: f64,
    /// This process's CPU use, fraction of a core.
    pub client_util: f64,
    /// Allocations completed in each second of the window: a rate that falls as sessions
    /// accumulate shows work that grows with them.
    pub per_second: Vec<u64>,
}

/// Runs `concurrency` request loops over `clients` for `warmup + window`; counts what completes
/// in the window.
pub async fn closed_loop(
    clients: &[SessionServiceClient<Channel>],
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    ctl_pid: u32,
) -> anyhow::Result<Throughput> {
    let ok = Arc::new(AtomicU64::new(0));
    let err = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + warmup + window;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = clients[t % clients.len()].clone();
        let (ok, err) = (ok.clone(), err.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end
                && ok.load(Relaxed) + err.load(Relaxed) < MAX_REQUESTS
                && !crate::stop_requested()
            {
                i += 1;
                match c.allocate_session(request(&format!("c{t}"), i)).await {
                    Ok(_) => ok.fetch_add(1, Relaxed),
                    Err(_) => err.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    if crate::stop_requested() {
        anyhow::bail!("interrupted");
    }
    let (ok0, err0) = (ok.load(Relaxed), err.load(Relaxed));
    let (cpu0, me0, t0) = (cpu::process_cpu(ctl_pid)?, cpu::self_cpu()?, Instant::now());
    let mut per_second = Vec::new();
    let mut last = ok0;
    for i in 1..=window.as_secs() {
        tokio::time::sleep_until((t0 + Duration::from_secs(i)).into()).await;
        let now = ok.load(Relaxed);
        per_second.push(now - last);
        last = now;
    }
    tokio::time::sleep_until((t0 + window).into()).await;
    let (ok1, err1) = (ok.load(Relaxed), err.load(Relaxed));
    let (cpu1, me1, t1) = (cpu::process_cpu(ctl_pid)?, cpu::self_cpu()?, Instant::now());
    for t in tasks {
        let _ = t.await;
    }
    let secs = t1.duration_since(t0).as_secs_f64();
    let n = (ok1 - ok0).max(1);
    let ctl = (cpu1 - cpu0).as_secs_f64();
    Ok(Throughput {
        concurrency,
        per_sec: (ok1 - ok0) as f64 / secs,
        errors: err1 - err0,
        ctl_us_per_alloc: ctl * 1e6 / n as f64,
        ctl_util: ctl / secs,
        client_util: (me1 - me0).as_secs_f64() / secs,
        per_second,
    })
}

/// What an open-loop run measured.
#[derive(Debug, Clone)]
pub struct Latency {
    /// The rate asked for.
    pub target_per_sec: u64,
    /// Requests issued per second in the window.
    pub issued_per_sec: f64,
    /// Failed requests in the window.
    pub errors: u64,
    /// Latency percentiles, milliseconds: 50th, 99th, 99.9th, and the largest.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Controller CPU use, fraction of a core.
    pub ctl_util: f64,
}

/// Issues `rate` requests per second for `warmup + window`, each on its own task (so a slow
/// answer delays no later request); records the latency, issue to answer, of those issued in
/// the window.
pub async fn open_loop(
    clients: &[SessionServiceClient<Channel>],
    rate: u64,
    warmup: Duration,
    window: Duration,
    ctl_pid: u32,
) -> anyhow::Result<Latency> {
    let hist = Arc::new(std::sync::Mutex::new(crate::udpgen::histogram()));
    let err = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let window_start = start + warmup;
    let end = window_start + window;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut issued, mut issued_in_window) = (0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut cpu0 = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= end || issued >= MAX_REQUESTS {
            break;
        }
        if crate::stop_requested() {
            anyhow::bail!("interrupted");
        }
        if cpu0.is_none() && now >= window_start {
            cpu0 = Some((cpu::process_cpu(ctl_pid)?, now));
        }
        let due = (rate as f64 * now.duration_since(start).as_secs_f64()) as u64;
        while issued < due {
            issued += 1;
            let measured = now >= window_start;
            issued_in_window += u64::from(measured);
            let mut c = clients[issued as usize % clients.len()].clone();
            let (hist, err) = (hist.clone(), err.clone());
            let req = request("open", issued);
            tasks.spawn(async move {
                let t = Instant::now();
                let r = c.allocate_session(req).await;
                if measured {
                    match r {
                        Ok(_) => {
                            let _ = hist
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .record(t.elapsed().as_nanos().max(1) as u64);
                        }
                        Err(_) => {
                            err.fetch_add(1, Relaxed);
                        }
                    }
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    let (c0, t0) = cpu0.context("window never started")?;
    let (c1, t1) = (cpu::process_cpu(ctl_pid)?, Instant::now());
    while tasks.join_next().await.is_some() {}
    let secs = t1.duration_since(t0).as_secs_f64();
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    Ok(Latency {
        target_per_sec: rate,
        issued_per_sec: issued_in_window as f64 / secs,
        errors: err.load(Relaxed),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1e6,
        ctl_util: (c1 - c0).as_secs_f64() / secs,
    })
}
