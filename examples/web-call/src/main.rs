//! `veil-web-call`: an example signaling server for a two-person browser call through Veil.
//!
//! It serves one page, `/room/{name}`. The first browser to open a room waits; when the second
//! arrives, the server asks the Veil controller for a session (`AllocateSession`, two
//! participants) and sends each browser its own leg's `ice_servers`, never the other's. It then
//! carries the WebRTC offer, answer and ICE candidates between the two browsers, which call
//! each other relay-only through Veil's TURN. When either browser leaves, the room ends and
//! the server releases the session (`ReleaseSession`).
//!
//! Between page and server: `GET /room/{name}/events` is a stream of server-sent events, one
//! per participant (when it ends, the participant has left); `POST /room/{name}/signal/{peer}`
//! carries a description or a candidate to the other participant, and
//! `POST /room/{name}/leave/{peer}` hangs up.
//!
//! It learns client addresses only as the TCP connections it accepts, keeps none and logs none,
//! and never logs a TURN credential or its controller token. It is an example, not a product:
//! README.md says what a real signaling service adds (who the users are, who may join which
//! room, limits, TLS).

#![forbid(unsafe_code)]

mod controller;
mod room;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use clap::Parser;
use tokio::sync::watch;
use tracing::info;

use crate::controller::Controller;
use crate::room::Rooms;

/// The page every participant loads.
const PAGE: &str = include_str!("page.html");

/// veil-web-call: an example signaling server for two-person browser calls through Veil. It
/// serves a page at /room/NAME; when a second browser opens the same room, it allocates a Veil
/// session for the two, gives each browser its own leg's TURN servers, relays their offer,
/// answer and ICE candidates, and releases the session when one of them leaves. Every flag can
/// also be set through the environment variable named in its description.
#[derive(Parser, Debug)]
#[command(name = "veil-web-call", version)]
struct Config {
    /// HTTP address for the page and the signaling. Browsers give the microphone only to a
    /// secure context: http://127.0.0.1 or http://localhost, or HTTPS in front of this server.
    #[arg(long, env = "VEIL_WEB_CALL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// The Veil controller's gRPC URL, for example http://127.0.0.1:50051 (with
    /// `veil-controller --dev`, the `controller` of its READY line).
    #[arg(long, env = "VEIL_WEB_CALL_CONTROLLER")]
    controller: String,

    /// Bearer token for the controller's SessionService: one of its --signaling-tokens
    /// (VEIL_CONTROLLER_SIGNALING_TOKENS). Unset: no token is sent, which only a controller
    /// with an open signaling role accepts (--dev).
    #[arg(long, env = "VEIL_WEB_CALL_CONTROLLER_TOKEN", hide_env_values = true)]
    controller_token: Option<String>,

    /// Lifetime of each call's session and TURN credentials, in seconds (60 to 86400). The
    /// server releases a session when its call ends; expiry is the safety net.
    #[arg(
        long,
        env = "VEIL_WEB_CALL_TTL_SECS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u32).range(60..=86400)
    )]
    ttl_secs: u32,

    /// Log filter, for example `info` or `veil_web_call=debug`.
    #[arg(long, env = "VEIL_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and succeed; a bad flag exits 64 (EX_USAGE).
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 64 } else { 0 });
        }
    };
    // The rest of the configuration is checked before anything is bound, and exits 64 too.
    let (filter, controller) = match check(&config) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("veil-web-call: {e:#}");
            std::process::exit(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(&config, controller).await {
        eprintln!("veil-web-call: {e:#}");
        std::process::exit(1);
    }
}

/// The log filter and the controller client the flags describe.
fn check(config: &Config) -> anyhow::Result<(tracing_subscriber::EnvFilter, Controller)> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?;
    let controller = Controller::new(
        &config.controller,
        config.controller_token.as_deref(),
        config.ttl_secs,
    )?;
    Ok((filter, controller))
}

async fn run(config: &Config, controller: Controller) -> anyhow::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let rooms = Rooms::new(controller, stopping);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    let addr = listener.local_addr()?;
    // On stdout, for whoever started this server (the test reads it).
    println!("listening on http://{addr}/");
    info!(%addr, controller = %config.controller, "serving");

    axum::serve(listener, router(rooms))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            info!("stopping: ending every room");
            // Each room tells its participants, releases its session and ends their event
            // streams; the server returns once every connection is done.
            let _ = stop.send(true);
        })
        .await
        .context("serve")
}

/// The routes: the page, and the signaling a page uses.
fn router(rooms: Arc<Rooms>) -> Router {
    Router::new()
        .route("/", get(new_room))
        .route("/room/{room}", get(page))
        .route("/room/{room}/events", get(events))
        .route("/room/{room}/signal/{peer}", post(signal))
        .route("/room/{room}/leave/{peer}", post(leave))
        // An SDP is a few kilobytes; nothing else a page sends is larger.
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(rooms)
}

/// `/`: a fresh room, whose address the visitor then shares.
async fn new_room() -> Redirect {
    Redirect::to(&format!("/room/{}", &random_id()[..12]))
}

/// `/room/{room}`: the page.
async fn page(Path(room): Path<String>) -> Response {
    if !room::valid_name(&room) {
        return (
            StatusCode::NOT_FOUND,
            "room names are 1 to 64 of A-Z a-z 0-9 - _",
        )
            .into_response();
    }
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

/// `/room/{room}/events`: joins the room; what the room tells this participant, as server-sent
/// events. The participant leaves when the stream ends (the page closed it, or went away).
async fn events(State(rooms): State<Arc<Rooms>>, Path(room): Path<String>) -> Response {
    if !room::valid_name(&room) {
        return StatusCode::NOT_FOUND.into_response();
    }
    // The keep-alive comments also notice a page that vanished without closing its connection.
    Sse::new(rooms.join(&room).await)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(2)))
        .into_response()
}

/// `/room/{room}/signal/{peer}`: a description or an ICE candidate (any JSON) for the other
/// participant.
async fn signal(
    State(rooms): State<Arc<Rooms>>,
    Path((room, peer)): Path<(String, String)>,
    body: Bytes,
) -> StatusCode {
    let Ok(data) = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if rooms.signal(&room, peer, data).await {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

/// `/room/{room}/leave/{peer}`: the participant hangs up (the page sends it as a beacon when
/// it is closed, too).
async fn leave(
    State(rooms): State<Arc<Rooms>>,
    Path((room, peer)): Path<(String, String)>,
) -> StatusCode {
    rooms.leave(&room, peer).await;
    StatusCode::NO_CONTENT
}

/// 128 random bits in hex: participant ids (which are also their capability to signal in the
/// room) and call ids.
pub(crate) fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a tokio runtime with signal handling (tokio::main enables it)");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
