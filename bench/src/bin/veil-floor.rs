//! `veil-floor`: the floor of the forwarding benchmark. A UDP forwarder that does nothing but
//! forward: `recvmmsg` a batch, look each source up in a fixed route table, `sendmmsg` the batch
//! to the destinations. No classification, no authentication, no rate limits, no GRO or GSO.
//! Whatever a relay spends beyond this per packet is the price of its features (or waste).
//!
//! ```sh
//! veil-floor --listen 127.0.0.1:7000 --route 127.0.0.1:5000=127.0.0.1:6000
//! ```
//!
//! Prints `READY` once listening; runs until killed.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::Context;
use clap::Parser;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, setsockopt, sockopt,
};

/// Datagrams per `recvmmsg` / `sendmmsg`, as in the relay's UDP workers.
const BATCH: usize = 32;
/// Largest datagram, as the relay.
const SLOT: usize = 1501;
/// Socket buffer asked for, as the relay (the kernel caps it at net.core.{r,w}mem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// A bare UDP forwarder by fixed source → destination routes (IPv4).
#[derive(Parser, Debug)]
struct Args {
    /// Address to receive on.
    #[arg(long)]
    listen: SocketAddrV4,
    /// `SRC=DST`: forward what arrives from SRC to DST. Repeat for more routes.
    #[arg(long = "route", value_parser = parse_route)]
    routes: Vec<(SocketAddrV4, SocketAddrV4)>,
}

fn parse_route(s: &str) -> Result<(SocketAddrV4, SocketAddrV4), String> {
    let (a, b) = s.split_once('=').ok_or("expected SRC=DST")?;
    Ok((
        a.parse().map_err(|e| format!("{a}: {e}"))?,
        b.parse().map_err(|e| format!("{b}: {e}"))?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sock = UdpSocket::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let _ = setsockopt(&sock, sockopt::RcvBuf, &SOCKET_BUFFER);
    let _ = setsockopt(&sock, sockopt::SndBuf, &SOCKET_BUFFER);
    let routes: HashMap<SocketAddrV4, SockaddrIn> = args
        .routes
        .iter()
        .map(|(s, d)| (*s, SockaddrIn::from(*d)))
        .collect();
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; SLOT]; BATCH];
    let mut rx = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let mut tx = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    // (length, destination) of each datagram received, in batch order.
    let mut got: Vec<(usize, Option<SockaddrIn>)> = Vec::with_capacity(BATCH);
    println!("READY");
    loop {
        got.clear();
        {
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = {
                let mut it = bufs.iter_mut();
                std::array::from_fn(|_| [IoSliceMut::new(it.next().expect("BATCH buffers"))])
            };
            // Blocks until at least one datagram, then takes what is queued, up to BATCH.
            let res = match recvmmsg(fd, &mut rx, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(r) => r,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNREFUSED) => continue,
                Err(e) => return Err(e).context("recvmmsg"),
            };
            for m in res {
                let dst = m
                    .address
                    .and_then(|a| routes.get(&SocketAddrV4::from(a)).copied());
                got.push((m.bytes, dst));
            }
        }
        // Routed datagrams, in order, as one sendmmsg.
        let mut n = 0;
        let mut iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|_| [IoSlice::new(&[])]);
        let mut addrs: [Option<SockaddrIn>; BATCH] = [None; BATCH];
        for (i, (len, dst)) in got.iter().enumerate() {
            if let Some(d) = dst {
                iovs[n] = [IoSlice::new(&bufs[i][..*len])];
                addrs[n] = Some(*d);
                n += 1;
            }
        }
        if n > 0 {
            let cmsgs: [ControlMessage<'_>; 0] = [];
            // A failed send (ICMP port unreachable, a full buffer) drops the rest of the batch:
            // the floor does nothing more than a relay would.
            let _ = sendmmsg(fd, &mut tx, &iovs, &addrs[..n], cmsgs, MsgFlags::empty());
        }
    }
}
