//! The example end to end: a real local Veil cluster (a controller and two relays, in this
//! process), the `veil-web-call` binary, and two headless Chromium browsers (Debian's
//! `chromium` and `chromium-driver`, installed by scripts/test.sh; without them this test
//! fails, never skips) that open the same room, as two people would.
//!
//! It checks what the example shows: both browsers connect, relay to relay on both sides; the
//! data channel echoes; audio from the fake microphone arrives both ways; each browser received
//! its own leg's `ice_servers` and nothing of the other's; when one browser leaves, the session
//! is released and the other is told; a controller that refuses the server's credential is
//! named on both pages; and the server's log holds no TURN credential, no controller token and
//! no client address. Every process it starts is stopped by PID; the browser part is bounded
//! by [`BUDGET`].

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::transport::Channel;
use veil_controller::ControllerServer;
use veil_controller::config::Settings;
use veil_controller::dev::{Cluster, Options};
use veil_proto::v1 as pb;
use veil_proto::v1::session_service_client::SessionServiceClient;
use veil_testkit::browser::{self, Browser};

/// Pings each page sends over the data channel (its `PINGS`), each to be echoed.
const MESSAGES: u64 = 20;
/// Audio packets each side must receive (20 ms frames: half a second of the fake tone).
const AUDIO_PACKETS: u64 = 25;
/// The browser part of the test, from the first chromedriver to the last check.
const BUDGET: Duration = Duration::from_secs(45);
/// The signaling token the second controller accepts.
const TOKEN: &str = "the-right-signaling-token";
/// The one the second example server presents instead.
const WRONG_TOKEN: &str = "a-wrong-signaling-token-4711";

#[test]
fn two_browsers_call_relay_only_through_the_example_signaling_server() {
    browser::require_installed();
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt
        .block_on(Cluster::start(Options {
            relays: 2,
            ..Options::default()
        }))
        .unwrap();
    // A second controller, which wants a signaling token (and has no relays; it refuses
    // before placement matters).
    let (guarded_url, stop_guarded, guarded) = rt.block_on(async {
        let settings = Settings {
            signaling_tokens: vec![TOKEN.into()],
            ..Settings::local(cluster.keys.clone())
        };
        let server = ControllerServer::load(settings).await.unwrap();
        let url = format!("http://{}", server.grpc_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        (url, stop, task)
    });
    let mut api = rt
        .block_on(SessionServiceClient::connect(
            cluster.controller_url.clone(),
        ))
        .unwrap();

    let mut server = WebCall::start(&cluster.controller_url, None);
    let mut refusing = WebCall::start(&guarded_url, Some(WRONG_TOKEN));
    let outcome = drive(&rt, &mut api, &server, &refusing);
    let logs = [server.log(), refusing.log()];
    let o = match outcome {
        Ok(o) => o,
        Err(e) => panic!(
            "the web call failed: {e}\nserver log:\n{}\nrefusing server log:\n{}",
            logs[0], logs[1]
        ),
    };
    eprintln!(
        "web call: connected {:?} after the second browser opened the room; session released \
         {:?} after the first left; browsers {:?} in all",
        o.connected_after, o.released_after, o.browsers_took
    );

    // Each browser connected relay to relay, echoed, and heard the other.
    for (name, s) in SIDES.iter().zip(&o.call) {
        assert_eq!(s["connectionState"], "connected", "{name}: {s}");
        assert_eq!(
            (
                s["selectedPair"]["local"].as_str(),
                s["selectedPair"]["remote"].as_str()
            ),
            (Some("relay"), Some("relay")),
            "{name}'s selected candidate pair: {s}"
        );
        let gathered = s["localCandidateTypes"].as_array().unwrap();
        assert!(!gathered.is_empty(), "{name}: {s}");
        assert!(gathered.iter().all(|t| t == "relay"), "{name}: {s}");
        assert!(s["echoes"].as_u64().unwrap() >= MESSAGES, "{name}: {s}");
        assert!(
            s["audioPacketsReceived"].as_u64().unwrap() >= AUDIO_PACKETS,
            "{name}: {s}"
        );
        assert!(s["error"].is_null(), "{name}: {s}");
    }

    // Each browser got exactly one leg's servers, its own: the two legs of the session, one
    // each, and nothing of the other's credentials in anything the server sent it.
    assert_eq!(o.session.legs.len(), 2, "{:?}", o.session);
    let legs: Vec<Value> = o.session.legs.iter().map(ice_servers).collect();
    let mine: Vec<usize> = o
        .call
        .iter()
        .map(|s| {
            legs.iter()
                .position(|l| *l == s["iceServers"])
                .unwrap_or_else(|| panic!("{} are no leg's: {legs:?}", s["iceServers"]))
        })
        .collect();
    assert_ne!(mine[0], mine[1], "both browsers got the same leg");
    for (side, s) in o.call.iter().enumerate() {
        let own = &o.session.legs[mine[side]];
        let other = &o.session.legs[mine[1 - side]];
        assert_eq!(own.ice_servers.len(), 2, "primary and backup: {own:?}");
        assert!(own.ice_servers.iter().all(|x| !x.username.is_empty()));
        for (a, b) in own.ice_servers.iter().zip(&other.ice_servers) {
            assert_ne!(a.username, b.username, "the legs share a TURN username");
        }
        let received: Vec<&str> = s["received"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        let calls: Vec<Value> = received
            .iter()
            .map(|m| serde_json::from_str::<Value>(m).unwrap())
            .filter(|m| m["type"] == "call")
            .collect();
        assert_eq!(calls.len(), 1, "{}: {received:?}", SIDES[side]);
        assert_eq!(calls[0]["ice_servers"], legs[mine[side]]);
        let everything = received.concat();
        for x in &other.ice_servers {
            assert!(
                !everything.contains(&x.username) && !everything.contains(&x.credential),
                "{} received the other leg's credentials: {received:?}",
                SIDES[side]
            );
        }
        // Its selected pair's local end is an allocation on one of its own leg's servers.
        let url = s["selectedPair"]["localUrl"].as_str().unwrap_or_default();
        assert!(
            own.ice_servers
                .iter()
                .any(|x| x.urls.iter().any(|u| u == url)),
            "{}: selected pair from {url}, its servers {:?}",
            SIDES[side],
            own.ice_servers
        );
    }

    // Leaving released the session and told the one who stayed.
    assert_eq!(o.released.state, pb::SessionState::Released as i32);
    assert_eq!(
        o.stayed["ended"], "The other participant left.",
        "{}",
        o.stayed
    );

    // The controller's refusal reached both pages, named.
    for (name, s) in SIDES.iter().zip(&o.refused) {
        let error = s["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("refused this signaling server's credential")
                && error.contains("UNAUTHENTICATED"),
            "{name}: {s}"
        );
    }

    // Both servers stop cleanly on SIGTERM (releasing what is left), and their logs hold no
    // secret and no client address: the only loopback addresses in them are the server's own
    // and its controller's.
    assert!(server.stop().is_some_and(|s| s.success()), "{}", logs[0]);
    assert!(refusing.stop().is_some_and(|s| s.success()), "{}", logs[1]);
    let logs = [server.log(), refusing.log()];
    assert!(logs[0].contains("call allocated"), "{}", logs[0]);
    assert!(logs[0].contains("session released"), "{}", logs[0]);
    assert!(logs[1].contains("UNAUTHENTICATED"), "{}", logs[1]);
    let secrets: Vec<&str> = o
        .session
        .legs
        .iter()
        .flat_map(|l| &l.ice_servers)
        .flat_map(|x| [x.username.as_str(), x.credential.as_str()])
        .chain([TOKEN, WRONG_TOKEN])
        .collect();
    for (log, (web, controller)) in logs.iter().zip([
        (&server.addr, &cluster.controller_url),
        (&refusing.addr, &guarded_url),
    ]) {
        for secret in &secrets {
            assert!(!log.contains(secret), "a secret in the log: {log}");
        }
        let rest = log
            .replace(web.as_str(), "")
            .replace(controller.as_str(), "");
        assert!(!rest.contains("127.0."), "an address in the log: {log}");
    }

    let _ = stop_guarded.send(());
    rt.block_on(async {
        guarded.await.unwrap().unwrap();
        cluster.shutdown().await.unwrap();
    });
    eprintln!("whole test: {:?}", started.elapsed());
}

const SIDES: [&str; 2] = ["alice", "bob"];

/// What the browsers showed.
struct Outcome {
    /// Each page's `veilState` once the call was up and had carried messages and audio.
    call: [Value; 2],
    /// The session the server allocated, as the controller had it during the call.
    session: pb::Session,
    /// The same after alice left.
    released: pb::Session,
    /// Bob's `veilState` after alice left.
    stayed: Value,
    /// Each page's `veilState` in a room of the server the controller refuses.
    refused: [Value; 2],
    connected_after: Duration,
    released_after: Duration,
    browsers_took: Duration,
}

/// Runs the whole browser part in two fresh browsers; returns what it showed, or why it failed
/// (with both pages' last state).
fn drive(
    rt: &tokio::runtime::Runtime,
    api: &mut SessionServiceClient<Channel>,
    server: &WebCall,
    refusing: &WebCall,
) -> Result<Outcome, String> {
    let start = Instant::now();
    let deadline = start + BUDGET;
    let browsers = [
        Browser::launch(SIDES[0], browser::Options::default())?,
        Browser::launch(SIDES[1], browser::Options::default())?,
    ];
    let result = (|| {
        // Alice first, so that she waits in the room when Bob arrives.
        let room = format!("{}room/test-call", server.url);
        browsers[0].open(&room)?;
        wait(&browsers[0], deadline, "waiting", |s| {
            s["phase"].as_str().unwrap_or("").starts_with("Waiting")
        })?;
        let opened = Instant::now();
        browsers[1].open(&room)?;
        let up = |s: &Value| s["connectionState"] == "connected";
        wait(&browsers[0], deadline, "connected", up)?;
        wait(&browsers[1], deadline, "connected", up)?;
        let connected_after = opened.elapsed();
        let done = |s: &Value| {
            s["echoes"].as_u64() >= Some(MESSAGES)
                && s["audioPacketsReceived"].as_u64() >= Some(AUDIO_PACKETS)
                && s["selectedPair"].is_object()
        };
        let call = [
            wait(&browsers[0], deadline, "echoes and audio", done)?,
            wait(&browsers[1], deadline, "echoes and audio", done)?,
        ];
        let session = rt.block_on(get_session(api, &server.session_id()?))?;

        // Alice leaves (her page goes away): the server releases the session.
        let left = Instant::now();
        browsers[0].open("about:blank")?;
        let released = loop {
            let s = rt.block_on(get_session(api, &session.session_id))?;
            if s.state == pb::SessionState::Released as i32 {
                break s;
            }
            if left.elapsed() > Duration::from_secs(5) {
                return Err(format!("not released 5 s after alice left: {s:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let released_after = left.elapsed();
        let stayed = wait(&browsers[1], deadline, "told the call ended", |s| {
            s["ended"].is_string()
        })?;

        // A room on the server whose controller refuses its credential.
        let room = format!("{}room/refused", refusing.url);
        browsers[0].open(&room)?;
        wait(&browsers[0], deadline, "waiting", |s| {
            s["phase"].as_str().unwrap_or("").starts_with("Waiting")
        })?;
        browsers[1].open(&room)?;
        let failed = |s: &Value| s["error"].is_string();
        let refused = [
            wait(&browsers[0], deadline, "an error", failed)?,
            wait(&browsers[1], deadline, "an error", failed)?,
        ];
        Ok(Outcome {
            call,
            session,
            released,
            stayed,
            refused,
            connected_after,
            released_after,
            browsers_took: Duration::ZERO,
        })
    })();
    match result {
        Ok(mut o) => {
            drop(browsers);
            o.browsers_took = start.elapsed();
            Ok(o)
        }
        Err(e) => {
            let mut msg = e;
            for b in &browsers {
                let state = b.execute(STATE, json!([]), Duration::from_secs(5));
                msg += &format!("\n{}: {state:?}", b.name);
            }
            Err(msg)
        }
    }
}

/// Reads a page's `veilState`.
const STATE: &str = "return window.veilState || null;";

/// Polls `b`'s `veilState` until `ready` holds (then returns it), the call ends or fails
/// without it, or `deadline`.
fn wait(
    b: &Browser,
    deadline: Instant,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    loop {
        let s = b.execute(STATE, json!([]), Duration::from_secs(5))?;
        if ready(&s) {
            return Ok(s);
        }
        if s["error"].is_string() || s["ended"].is_string() {
            return Err(format!(
                "{}: waiting for {what}, the call ended: {s}",
                b.name
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("{}: no {what} in time: {s}", b.name));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A leg's `ice_servers` as the page receives them (the W3C `RTCIceServer` list).
fn ice_servers(leg: &pb::Leg) -> Value {
    leg.ice_servers
        .iter()
        .map(|s| json!({"urls": s.urls, "username": s.username, "credential": s.credential}))
        .collect()
}

async fn get_session(
    api: &mut SessionServiceClient<Channel>,
    session_id: &str,
) -> Result<pb::Session, String> {
    let request = pb::GetSessionRequest {
        session_id: session_id.to_owned(),
    };
    api.get_session(request)
        .await
        .map_err(|e| format!("GetSession {session_id}: {e}"))?
        .into_inner()
        .session
        .ok_or_else(|| "GetSession: no session".to_owned())
}

/// A `veil-web-call` process on 127.0.0.1 (a port of its choosing); killed by PID on drop if
/// it still runs.
struct WebCall {
    child: Child,
    /// `http://127.0.0.1:PORT/`.
    url: String,
    /// `127.0.0.1:PORT`.
    addr: String,
    /// Everything it wrote, stdout and stderr.
    log: Arc<Mutex<Vec<u8>>>,
}

impl WebCall {
    fn start(controller: &str, token: Option<&str>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil-web-call"));
        cmd.args(["--listen", "127.0.0.1:0", "--controller", controller])
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "VEIL_WEB_CALL_LISTEN",
            "VEIL_WEB_CALL_CONTROLLER",
            "VEIL_WEB_CALL_CONTROLLER_TOKEN",
            "VEIL_WEB_CALL_TTL_SECS",
            "VEIL_LOG",
        ] {
            cmd.env_remove(var);
        }
        if let Some(token) = token {
            // Through the environment, as a deployment would pass it: not in argv.
            cmd.env("VEIL_WEB_CALL_CONTROLLER_TOKEN", token);
        }
        let mut child = cmd.spawn().expect("start veil-web-call");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        for (pipe, tx) in [
            (Box::new(out) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(err), None),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let (Some(tx), Some(url)) = (&tx, line.strip_prefix("listening on ")) {
                        let _ = tx.send(url.to_owned());
                    }
                    let mut log = log.lock().unwrap();
                    log.extend_from_slice(line.as_bytes());
                    log.push(b'\n');
                }
            });
        }
        let mut server = Self {
            child,
            url: String::new(),
            addr: String::new(),
            log,
        };
        server.url = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("veil-web-call did not start ({e}): {}", server.log()));
        server.addr = server
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        server
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// The session id of the call it allocated, from its log.
    fn session_id(&self) -> Result<String, String> {
        let log = self.log();
        log.lines()
            .filter(|l| l.contains("call allocated"))
            .find_map(|l| l.split("session=").nth(1))
            .map(|rest| rest.chars().take(16).collect())
            .ok_or_else(|| format!("no allocation in the log: {log}"))
    }

    /// SIGTERM, then up to 5 s for it to exit; its status, or None if it had to be killed.
    fn stop(&mut self) -> Option<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WebCall {
    fn drop(&mut self) {
        // By PID, through the Child; a process already reaped is not signalled.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
