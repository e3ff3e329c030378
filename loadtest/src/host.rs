//! What this host's kernel says about a run: UDP counters (`/proc/net/snmp`, `/proc/net/snmp6`),
//! each UDP socket's drop count (`/proc/net/udp`, `/proc/net/udp6`), and CPU time (`/proc/stat`,
//! `/proc/self/stat`).
//!
//! These tell where datagrams died that no application ever saw: a socket whose receive buffer
//! was full when a datagram arrived drops it and counts it (`RcvbufErrors`, and the socket's own
//! `drops`). On a local run the relays' sockets and the participants' sockets are all on this
//! host, so the per-socket counts say which side dropped; against a remote cluster they cover the
//! generator's side only. Everything here reads Linux `/proc`; elsewhere, or when a file cannot
//! be read, the figures are absent (`None`), never zero.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;

/// The kernel's UDP counters (IPv4 and IPv6 added up), or their change over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UdpCounters {
    /// Datagrams delivered to sockets.
    pub in_datagrams: u64,
    /// Datagrams that could not be delivered (receive buffer full, checksum, ...).
    pub in_errors: u64,
    /// Datagrams dropped because the receiving socket's buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams not sent because the sending socket's buffer was full.
    pub sndbuf_errors: u64,
    /// Datagrams sent.
    pub out_datagrams: u64,
}

impl UdpCounters {
    /// Reads both files; `None` if neither can be read.
    pub fn read() -> Option<Self> {
        let v4 = std::fs::read_to_string("/proc/net/snmp")
            .ok()
            .and_then(|t| parse_snmp(&t));
        let v6 = std::fs::read_to_string("/proc/net/snmp6")
            .ok()
            .map(|t| parse_snmp6(&t));
        match (v4, v6) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or_default().plus(&b.unwrap_or_default())),
        }
    }

    fn plus(&self, o: &Self) -> Self {
        Self {
            in_datagrams: self.in_datagrams + o.in_datagrams,
            in_errors: self.in_errors + o.in_errors,
            rcvbuf_errors: self.rcvbuf_errors + o.rcvbuf_errors,
            sndbuf_errors: self.sndbuf_errors + o.sndbuf_errors,
            out_datagrams: self.out_datagrams + o.out_datagrams,
        }
    }

    /// `self - before`, saturating (counters only grow, but a namespace can be reset).
    pub fn minus(&self, before: &Self) -> Self {
        Self {
            in_datagrams: self.in_datagrams.saturating_sub(before.in_datagrams),
            in_errors: self.in_errors.saturating_sub(before.in_errors),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(before.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(before.sndbuf_errors),
            out_datagrams: self.out_datagrams.saturating_sub(before.out_datagrams),
        }
    }
}

/// Parses the `Udp:` header and value lines of `/proc/net/snmp`.
fn parse_snmp(text: &str) -> Option<UdpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |k: &str| {
        names
            .iter()
            .position(|n| *n == k)
            .and_then(|i| values.get(i).copied())
            .unwrap_or(0)
    };
    Some(UdpCounters {
        in_datagrams: get("InDatagrams"),
        in_errors: get("InErrors"),
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
        out_datagrams: get("OutDatagrams"),
    })
}

/// Parses the `Udp6*` lines of `/proc/net/snmp6` (`name value` per line).
fn parse_snmp6(text: &str) -> UdpCounters {
    let map: HashMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?, it.next()?.parse().ok()?))
        })
        .collect();
    let get = |k: &str| map.get(k).copied().unwrap_or(0);
    UdpCounters {
        in_datagrams: get("Udp6InDatagrams"),
        in_errors: get("Udp6InErrors"),
        rcvbuf_errors: get("Udp6RcvbufErrors"),
        sndbuf_errors: get("Udp6SndbufErrors"),
        out_datagrams: get("Udp6OutDatagrams"),
    }
}

/// Every UDP socket of this network namespace with its local address and drop count.
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    /// `(local address, drops)`, one entry per socket (`SO_REUSEPORT` sockets share addresses).
    pub sockets: Vec<(SocketAddr, u64)>,
}

impl Sockets {
    /// Reads `/proc/net/udp` and `/proc/net/udp6`; `None` if neither can be read.
    pub fn read() -> Option<Self> {
        let v4 = std::fs::read_to_string("/proc/net/udp").ok();
        let v6 = std::fs::read_to_string("/proc/net/udp6").ok();
        if v4.is_none() && v6.is_none() {
            return None;
        }
        let mut sockets = Vec::new();
        for text in [v4, v6].into_iter().flatten() {
            sockets.extend(text.lines().skip(1).filter_map(parse_socket_line));
        }
        Some(Self { sockets })
    }

    /// Drops of the socket bound to exactly `addr` (0 if there is none).
    pub fn drops_of(&self, addr: SocketAddr) -> Option<u64> {
        let mut found = None;
        for (a, d) in &self.sockets {
            if same_socket(*a, addr) {
                *found.get_or_insert(0) += d;
            }
        }
        found
    }

    /// Drops summed over every socket that serves `addr` on this host: bound to it, or to the
    /// unspecified address on its port when `addr` is a loopback address (a relay bound to
    /// `0.0.0.0` or `[::]` serves loopback too). `None` if no socket serves it here.
    pub fn drops_serving(&self, addr: SocketAddr) -> Option<u64> {
        let mut found = None;
        for (a, d) in &self.sockets {
            let serves = same_socket(*a, addr)
                || (a.port() == addr.port() && a.ip().is_unspecified() && addr.ip().is_loopback());
            if serves {
                *found.get_or_insert(0) += d;
            }
        }
        found
    }
}

/// Equal addresses, counting an IPv4-mapped IPv6 address as its IPv4 address.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// One line of `/proc/net/udp{,6}`: `sl local rem st tx:rx tr:when retr uid timeout inode ref
/// pointer drops`. Addresses are hexadecimal words in host byte order, ports in big-endian hex.
fn parse_socket_line(line: &str) -> Option<(SocketAddr, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = fields.get(1)?;
    let drops: u64 = fields.last()?.parse().ok()?;
    if fields.len() < 13 {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let word = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), drops))
}

/// CPU time so far: the whole machine's and this process's, in the kernel's clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks of all CPUs, all states.
    pub total: u64,
    /// Ticks of all CPUs spent idle or waiting for IO.
    pub idle: u64,
    /// Ticks this process ran (user and system, all threads).
    pub process: u64,
}

impl CpuTimes {
    /// Reads `/proc/stat` and `/proc/self/stat`; `None` if either cannot be read.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (total, idle) = parse_proc_stat(&stat)?;
        Some(Self {
            total,
            idle,
            process: parse_self_stat(&own)?,
        })
    }

    /// `(machine busy, this process)` since `before`, each a fraction of the whole machine
    /// (every CPU); `None` if no time passed.
    pub fn since(&self, before: &Self) -> Option<(f64, f64)> {
        let total = self.total.checked_sub(before.total)?;
        if total == 0 {
            return None;
        }
        let idle = self.idle.saturating_sub(before.idle);
        let process = self.process.saturating_sub(before.process);
        Some((
            (1.0 - idle as f64 / total as f64).clamp(0.0, 1.0),
            (process as f64 / total as f64).clamp(0.0, 1.0),
        ))
    }
}

/// `(total, idle + iowait)` from the first line of `/proc/stat`.
fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user, so only the first eight add up to the total.
    let total = v.iter().take(8).sum();
    Some((total, v.get(3)? + v.get(4).copied().unwrap_or(0)))
}

/// `utime + stime` from `/proc/self/stat` (fields 14 and 15; the command name may hold spaces,
/// so fields are counted after its closing parenthesis).
fn parse_self_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters_parse() {
        let v4 = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                  Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                  Udp: 100 1 7 90 6 2 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let c = parse_snmp(v4).unwrap();
        assert_eq!(
            (
                c.in_datagrams,
                c.in_errors,
                c.rcvbuf_errors,
                c.sndbuf_errors,
                c.out_datagrams
            ),
            (100, 7, 6, 2, 90)
        );
        let v6 = parse_snmp6("Udp6InDatagrams  \t5\nUdp6RcvbufErrors 3\nUdpLite6InErrors 9\n");
        assert_eq!((v6.in_datagrams, v6.rcvbuf_errors, v6.in_errors), (5, 3, 0));
        let sum = c.plus(&v6);
        assert_eq!(sum.rcvbuf_errors, 9);
        assert_eq!(sum.minus(&c).rcvbuf_errors, 3);
    }

    #[test]
    fn socket_lines_parse_in_host_byte_order() {
        let v4 = "  12: 0200007F:A2C3 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12345 2 0000000000000000 17";
        let (addr, drops) = parse_socket_line(v4).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(addr, "127.0.0.2:41667".parse().unwrap());
        }
        assert_eq!(drops, 17);
        let v6 = "  3: 00000000000000000000000001000000:9C40 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 999 2 0000000000000000 4";
        let (addr, drops) = parse_socket_line(v6).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(addr, "[::1]:40000".parse().unwrap());
        }
        assert_eq!(drops, 4);
        assert!(parse_socket_line("   sl  local_address rem_address").is_none());
    }

    #[test]
    fn sockets_match_exactly_or_by_wildcard_on_loopback() {
        let s = Sockets {
            sockets: vec![
                ("0.0.0.0:40000".parse().unwrap(), 5),
                ("[::]:40000".parse().unwrap(), 1),
                ("127.0.0.1:50000".parse().unwrap(), 2),
                ("127.0.0.1:50000".parse().unwrap(), 3),
                ("[::ffff:127.0.0.9]:7".parse().unwrap(), 8),
            ],
        };
        assert_eq!(s.drops_serving("127.0.0.1:40000".parse().unwrap()), Some(6));
        assert_eq!(s.drops_serving("10.0.0.1:40000".parse().unwrap()), None);
        assert_eq!(s.drops_serving("127.0.0.1:50000".parse().unwrap()), Some(5));
        assert_eq!(s.drops_of("127.0.0.9:7".parse().unwrap()), Some(8));
        assert_eq!(s.drops_of("127.0.0.9:8".parse().unwrap()), None);
    }

    #[test]
    fn cpu_times_parse_and_divide() {
        let (total, idle) =
            parse_proc_stat("cpu  100 0 50 800 50 0 0 0 7 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!((total, idle), (1000, 850));
        let own = "4242 (a (weird) name) S 1 2 3 0 -1 0 0 0 0 0 30 20 0 0 20 0";
        assert_eq!(parse_self_stat(own), Some(50));
        let a = CpuTimes {
            total: 1000,
            idle: 850,
            process: 50,
        };
        let b = CpuTimes {
            total: 2000,
            idle: 1100,
            process: 550,
        };
        let (busy, me) = b.since(&a).unwrap();
        assert!((busy - 0.75).abs() < 1e-9 && (me - 0.5).abs() < 1e-9);
        assert_eq!(a.since(&a), None);
        // Whatever this host is, its own figures read (this crate's tests run on Linux).
        assert!(CpuTimes::read().is_some());
        assert!(UdpCounters::read().is_some());
        assert!(Sockets::read().is_some());
    }
}
