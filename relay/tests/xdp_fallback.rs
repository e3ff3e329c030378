//! `--xdp auto` where the fast path cannot attach (here: a build without the `xdp` feature):
//! the relay starts, forwards in userspace alone, and says so in `veil_relay_xdp_mode`; `--xdp
//! native` or `generic` is refused by the configuration check (`cli.rs`).
#![cfg(not(feature = "xdp"))]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use veil_relay::RelayServer;
use veil_relay::config::Settings;
use veil_relay::xdp::{Mode, Settings as XdpSettings};
use veil_relay_core::KeyRing;
use veil_relay_core::wire::{self, RelayMessage};

fn series(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn auto_without_a_fast_path_forwards_in_userspace_and_says_so() {
    let keys = KeyRing::from_keys(&[(1, [9; 32])], 1);
    let mut s = Settings::local(keys, "relay-xdp-fallback", Vec::new());
    s.workers = 1;
    s.xdp = XdpSettings {
        mode: Mode::Auto,
        interfaces: vec!["lo".into()],
    };
    let relay = RelayServer::load(s)
        .await
        .expect("auto never stops the relay");
    let (udp, ops) = (relay.udp_addr(), relay.ops_addr());
    let (stop, mut rx) = watch::channel(false);
    let task = tokio::spawn(relay.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));

    // Serving: a KEEPALIVE from a stranger draws NOT_BOUND, from the workers.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&wire::keepalive([1; 8]), udp).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(matches!(
        wire::parse_relay(&buf[..n]),
        Ok(RelayMessage::Error { .. })
    ));

    let mut c = TcpStream::connect(ops).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    c.read_to_string(&mut page).await.unwrap();
    assert_eq!(
        series(&page, r#"veil_relay_xdp_mode{mode="userspace"}"#),
        Some(1.0),
        "{page}"
    );
    for mode in ["off", "native", "generic"] {
        assert_eq!(
            series(&page, &format!(r#"veil_relay_xdp_mode{{mode="{mode}"}}"#)),
            Some(0.0)
        );
    }
    assert_eq!(series(&page, "veil_relay_xdp_legs"), Some(0.0));

    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}
