//! The address clients reach a relay on, when that is not an address of the node: a node behind
//! a 1:1 NAT (a cloud VM and its public IP) has only its private address on its interfaces,
//! and a relay must announce the public one. `--public-ip-file` names a file holding it, written
//! before the relay starts (in Kubernetes by an init container that reads the node's
//! `ExternalIP`: deploy/kubernetes/examples/relay-nat.yaml); the relay announces it with its
//! bound ports.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::Config;

/// Reads the IP address in `path`: one address, surrounding white space ignored.
pub fn read(path: &Path) -> anyhow::Result<IpAddr> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--public-ip-file: cannot read {}", path.display()))?;
    let text = text.trim();
    let ip: IpAddr = text.parse().with_context(|| {
        format!(
            "--public-ip-file: {} holds {text:?}, not an IP address",
            path.display()
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        bail!(
            "--public-ip-file: {} holds {ip}, which clients cannot send to",
            path.display()
        );
    }
    Ok(ip)
}

impl Config {
    /// Fills --public-udp-addr and --public-quic-addr (where unset) from --public-ip-file and
    /// the bound ports. Call before [`Config::settings`]; without --public-ip-file it changes
    /// nothing.
    pub fn apply_public_ip_file(&mut self) -> anyhow::Result<()> {
        let Some(path) = &self.public_ip_file else {
            return Ok(());
        };
        let ip = read(path)?;
        if self.public_udp_addr.is_none() {
            self.public_udp_addr = Some(SocketAddr::new(ip, self.udp_addr.port()));
        }
        if let Some(quic) = self.quic_addr
            && self.public_quic_addr.is_none()
        {
            self.public_quic_addr = Some(SocketAddr::new(ip, quic.port()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("veil-public-ip-{name}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_file_fills_the_public_addresses_it_may() {
        let ip = file("ok", "203.0.113.7\n");
        let ipf = ip.to_str().unwrap();
        let mut c = Config::try_parse_from([
            "veil-relay",
            "--key-file",
            "/k",
            "--udp-addr",
            "0.0.0.0:40000",
            "--quic-addr",
            "0.0.0.0:40443",
            "--public-ip-file",
            ipf,
        ])
        .unwrap();
        c.apply_public_ip_file().unwrap();
        assert_eq!(
            c.public_udp_addr,
            Some("203.0.113.7:40000".parse().unwrap())
        );
        assert_eq!(
            c.public_quic_addr,
            Some("203.0.113.7:40443".parse().unwrap())
        );
        // An address given explicitly wins.
        let mut c = Config::try_parse_from([
            "veil-relay",
            "--key-file",
            "/k",
            "--udp-addr",
            "[::]:40000",
            "--public-udp-addr",
            "198.51.100.1:41000",
            "--public-ip-file",
            ipf,
        ])
        .unwrap();
        c.apply_public_ip_file().unwrap();
        assert_eq!(
            c.public_udp_addr,
            Some("198.51.100.1:41000".parse().unwrap())
        );
        assert_eq!(c.public_quic_addr, None);
        std::fs::remove_file(ip).ok();
    }

    #[test]
    fn a_bad_file_is_an_error_naming_the_flag() {
        for (name, text) in [
            ("empty", ""),
            ("name", "node-1.example"),
            ("any", "0.0.0.0"),
        ] {
            let p = file(name, text);
            let e = read(&p).unwrap_err().to_string();
            assert!(e.starts_with("--public-ip-file: "), "{e}");
            std::fs::remove_file(p).ok();
        }
        let e = read(Path::new("/nonexistent/veil-ip"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        assert_eq!(
            read(&file("v6", " 2001:db8::1 \n")).unwrap(),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}
