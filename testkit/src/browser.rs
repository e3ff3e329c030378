//! Headless Chromium for WebRTC tests (feature `browser`): Debian's `chromium` under its own
//! `chromedriver`, with a fresh profile, driven over W3C WebDriver in plain HTTP/1.1 (no
//! selenium, no npm). Blocking: call it from a test thread, or from `spawn_blocking`.
//!
//! [`Browser::launch`] passes the flags WebRTC needs on a machine like CI: headless as root,
//! fake microphone and camera with no permission prompt, no background network traffic, no
//! name resolution but for 127.0.0.1 and, required when loopback is the only interface,
//! `--allow-loopback-in-peer-connection` (without it Chromium gathers no candidate and says
//! nothing). Dropping a [`Browser`] quits it and stops chromedriver and anything it started,
//! each by PID.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Panics, naming what to install, unless Chromium and chromedriver are installed: a browser
/// test fails without them, it never skips.
pub fn require_installed() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver \
             (scripts/test.sh does, as root: apt-get install -y chromium chromium-driver)"
        );
    }
}

/// How to start a browser, beyond the flags every one gets.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Record a NetLog (every datagram the network service sends and receives, with its peer
    /// address) at [`Browser::net_log`].
    pub net_log: bool,
    /// More Chromium flags.
    pub args: Vec<String>,
}

/// One headless Chromium under its own chromedriver, with a fresh profile in its own
/// directory. Dropping it ends the WebDriver session (Chromium quits), then stops chromedriver
/// and anything it started that still runs, each by PID, and removes the directory unless
/// [`Browser::keep`] is set.
pub struct Browser {
    /// Names the browser in errors.
    pub name: String,
    /// Keep the profile directory (and NetLog) when dropped, for a failure's post-mortem.
    pub keep: bool,
    driver: Child,
    port: u16,
    session: Option<String>,
    dir: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("name", &self.name)
            .field("chromedriver_pid", &self.driver.id())
            .field("port", &self.port)
            .field("session", &self.session)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts chromedriver, then Chromium through it; within 40 s or an error.
    pub fn launch(name: &str, options: Options) -> Result<Self, String> {
        static LAUNCHED: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "veil-chromium-{}-{}-{name}",
            std::process::id(),
            LAUNCHED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profile")).map_err(|e| format!("{dir:?}: {e}"))?;
        let mut driver = Command::new(CHROMEDRIVER)
            .args(["--port=0", "--log-level=WARNING"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {CHROMEDRIVER}: {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Piped at spawn just above.
        let (out, err) = (driver.stdout.take().unwrap(), driver.stderr.take().unwrap());
        for (pipe, tx) in [
            (Box::new(out) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(err), None),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    // "ChromeDriver was started successfully on port 37305."
                    if let (Some(tx), Some(port)) =
                        (&tx, line.split("started successfully on port ").nth(1))
                    {
                        let _ = tx.send(port.trim_end_matches('.').parse::<u16>());
                    }
                    let mut log = log.lock().unwrap();
                    log.extend_from_slice(line.as_bytes());
                    log.push(b'\n');
                }
            });
        }
        let mut b = Self {
            name: name.to_owned(),
            keep: false,
            driver,
            port: 0,
            session: None,
            dir,
            log,
        };
        b.port = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(port)) => port,
            other => {
                return Err(format!(
                    "{name}: no chromedriver port ({other:?}): {}",
                    b.driver_log()
                ));
            }
        };
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", b.dir.join("profile").display()),
            "--use-fake-device-for-media-stream".to_owned(),
            "--use-fake-ui-for-media-stream".to_owned(),
            // Loopback is the only path to the relays here: without this Chromium gathers no
            // candidate at all.
            "--allow-loopback-in-peer-connection".to_owned(),
            // No name resolution at all, so nothing but the test touches the network (an IP
            // literal is mapped too, unless excluded).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".to_owned(),
        ];
        if options.net_log {
            args.push(format!("--log-net-log={}", b.net_log().display()));
        }
        args.extend(options.args);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "timeouts": {"script": 30000, "pageLoad": 10000},
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = webdriver(
            b.port,
            "POST",
            "/session",
            Some(&caps),
            Duration::from_secs(30),
        )
        .map_err(|e| format!("{name}: new session: {e}\n{}", b.driver_log()))?;
        b.session = Some(
            v["sessionId"]
                .as_str()
                .ok_or_else(|| format!("{name}: no session id in {v}"))?
                .to_owned(),
        );
        Ok(b)
    }

    /// The browser's own directory (its profile is `profile/` in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the NetLog goes with [`Options::net_log`]; complete once the browser has quit.
    pub fn net_log(&self) -> PathBuf {
        self.dir.join("netlog.json")
    }

    /// What chromedriver printed.
    pub fn driver_log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    fn session(&self) -> Result<&str, String> {
        self.session
            .as_deref()
            .ok_or_else(|| format!("{}: no WebDriver session", self.name))
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn open(&self, url: &str) -> Result<(), String> {
        let path = format!("/session/{}/url", self.session()?);
        webdriver(
            self.port,
            "POST",
            &path,
            Some(&json!({"url": url})),
            Duration::from_secs(15),
        )
        .map(drop)
        .map_err(|e| format!("{}: open {url}: {e}", self.name))
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns what
    /// it returns, as JSON.
    pub fn execute(&self, script: &str, args: Value, timeout: Duration) -> Result<Value, String> {
        let path = format!("/session/{}/execute/sync", self.session()?);
        let body = json!({"script": script, "args": args});
        webdriver(self.port, "POST", &path, Some(&body), timeout)
            .map_err(|e| format!("{}: execute: {e}", self.name))
    }

    /// Runs `script` in the page and waits (at most until `deadline`, and the 30 s script
    /// timeout) until it calls its last argument, the callback; returns what it passed.
    pub fn execute_async(
        &self,
        script: &str,
        args: Value,
        deadline: Instant,
    ) -> Result<Value, String> {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{}: execute_async: out of time", self.name))?;
        let path = format!("/session/{}/execute/async", self.session()?);
        let body = json!({"script": script, "args": args});
        webdriver(self.port, "POST", &path, Some(&body), left)
            .map_err(|e| format!("{}: execute_async: {e}", self.name))
    }

    /// Ends the WebDriver session: Chromium closes its pages and quits.
    pub fn quit(&mut self) -> Result<(), String> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = format!("/session/{session}");
        webdriver(self.port, "DELETE", &path, None, Duration::from_secs(10))
            .map(drop)
            .map_err(|e| format!("{}: quit: {e}", self.name))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.quit();
        // Whatever chromedriver started that still runs (a browser that did not quit), then
        // chromedriver itself: all ours, each by PID.
        for pid in descendants(self.driver.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The PIDs of every process below `pid`, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
        {
            parent.insert(p, ppid);
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (&child, _) in parent.iter().filter(|(_, pp)| **pp == p) {
            out.push(child);
            frontier.push(child);
        }
    }
    out
}

/// One W3C WebDriver command over its own HTTP/1.1 connection to the chromedriver on `port`;
/// returns the answer's `value`, or the WebDriver error.
pub fn webdriver(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect to chromedriver on port {port}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{method} {path}: timeout {timeout:?}: {e}"))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head_len, length) = loop {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("{method} {path}: connection closed mid-answer"));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("{method} {path}: no Content-Length in {head:?}"))?;
            break (end + 4, length);
        }
    };
    while raw.len() < head_len + length {
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("{method} {path}: connection closed mid-answer"));
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let status = String::from_utf8_lossy(&raw[..head_len])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    let v: Value = serde_json::from_slice(&raw[head_len..head_len + length])
        .map_err(|e| format!("{method} {path}: HTTP {status}, not JSON: {e}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!("{method} {path}: HTTP {status}: {value}"));
    }
    Ok(value)
}
