//! Rooms. One task per room owns everything about it (its two participants, its Veil
//! session), so nothing about a room is shared or locked: the HTTP handlers only send it
//! commands. The only lock is the map from room names to those tasks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::response::sse::Event;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tracing::{info, warn};

use crate::controller::{self, Controller, IceServer};

/// What the server tells a participant's page: the JSON of one server-sent event.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToPage {
    /// You are in the room; `peer` names you in your signal and leave requests.
    Joined { peer: String },
    /// The call is allocated: the TURN servers of your own leg (your credential: the other
    /// participant never sees it), and whether you make the offer.
    Call {
        ice_servers: Vec<IceServer>,
        offerer: bool,
    },
    /// A description or an ICE candidate from the other participant, as it sent it.
    Signal { data: serde_json::Value },
    /// The call is over.
    Ended { reason: &'static str },
    /// The call could not be made.
    Failed { message: String },
}

/// The open rooms, by name.
#[derive(Debug)]
pub(crate) struct Rooms {
    open: Mutex<HashMap<String, mpsc::Sender<Command>>>,
    controller: Controller,
    /// Turns true when the server stops: every room ends.
    stopping: watch::Receiver<bool>,
}

/// What the HTTP handlers ask of a room.
#[derive(Debug)]
enum Command {
    Join {
        peer: String,
        to_page: mpsc::Sender<ToPage>,
    },
    Signal {
        peer: String,
        data: serde_json::Value,
    },
    Leave {
        peer: String,
    },
}

/// Room names are 1 to 64 of `A-Z a-z 0-9 - _`: they appear in URLs.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Rooms {
    pub(crate) fn new(controller: Controller, stopping: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            controller,
            stopping,
        })
    }

    /// Adds a participant to the room `name`, opening it if needed. The stream carries what the
    /// room tells the participant's page; dropping it leaves the room.
    pub(crate) async fn join(self: &Arc<Self>, name: &str) -> Membership {
        let peer = crate::random_id();
        let (to_page, from_room) = mpsc::channel(256);
        let mut command = Command::Join {
            peer: peer.clone(),
            to_page,
        };
        loop {
            let room = self.room(name);
            match room.send(command).await {
                Ok(()) => {
                    return Membership {
                        from_room,
                        leave: Some((room, peer)),
                    };
                }
                // That room ended between the lookup and the send: open a new one.
                Err(mpsc::error::SendError(back)) => command = back,
            }
        }
    }

    /// Passes `data` from `peer` to the other participant of room `name`; false if there is no
    /// such room.
    pub(crate) async fn signal(&self, name: &str, peer: String, data: serde_json::Value) -> bool {
        let room = self.lock().get(name).cloned();
        match room {
            Some(room) => room.send(Command::Signal { peer, data }).await.is_ok(),
            None => false,
        }
    }

    /// `peer` leaves room `name`, which ends it.
    pub(crate) async fn leave(&self, name: &str, peer: String) {
        let room = self.lock().get(name).cloned();
        if let Some(room) = room {
            // A room that already ended has nothing left to do.
            let _ = room.send(Command::Leave { peer }).await;
        }
    }

    /// The task of room `name`, started if there is none (or only one that has ended).
    fn room(self: &Arc<Self>, name: &str) -> mpsc::Sender<Command> {
        let mut open = self.lock();
        if let Some(room) = open.get(name).filter(|r| !r.is_closed()) {
            return room.clone();
        }
        let (room, commands) = mpsc::channel(64);
        open.insert(name.to_owned(), room.clone());
        tokio::spawn(self.clone().run(name.to_owned(), commands));
        room
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Command>>> {
        // No code panics while holding it: it only guards map operations.
        self.open.lock().expect("the room map is never poisoned")
    }

    /// One room, from its first participant until it ends.
    async fn run(self: Arc<Self>, name: String, mut commands: mpsc::Receiver<Command>) {
        let mut room = Room::default();
        let mut stopping = self.stopping.clone();
        let end = loop {
            let command = tokio::select! {
                Some(command) = commands.recv() => command,
                _ = stopping.wait_for(|s| *s) => break End::Stopping,
            };
            if let Some(end) = room.handle(command, &self.controller).await {
                break end;
            }
        };
        // Take no more commands, so that whoever opens this room now gets a new one, and turn
        // away those who arrived meanwhile.
        commands.close();
        {
            let mut open = self.lock();
            if open.get(&name).is_some_and(|r| r.is_closed()) {
                open.remove(&name);
            }
        }
        while let Ok(command) = commands.try_recv() {
            if let Command::Join { to_page, .. } = command {
                tell(
                    &to_page,
                    ToPage::Failed {
                        message: "This room has just ended: reload the page to start a new call."
                            .into(),
                    },
                );
            }
        }
        let reason = match end {
            End::Left => Some("The other participant left."),
            End::Stopping => Some("The signaling server is stopping."),
            End::Failed => None,
        };
        if let Some(reason) = reason {
            for peer in &room.peers {
                tell(&peer.to_page, ToPage::Ended { reason });
            }
        }
        if let Some(session) = room.session.take() {
            match self.controller.release(&session).await {
                Ok(()) => info!(%session, "call ended, session released"),
                Err(status) => warn!(
                    %session,
                    code = controller::code_name(status.code()),
                    error = status.message(),
                    "ReleaseSession failed: the session lives until its expiry"
                ),
            }
        }
        // Dropping the room ends its participants' event streams.
    }
}

/// What one room task owns.
#[derive(Debug, Default)]
struct Room {
    /// In the order they joined: at most two.
    peers: Vec<Peer>,
    /// The Veil session, once both participants are in.
    session: Option<String>,
}

#[derive(Debug)]
struct Peer {
    id: String,
    to_page: mpsc::Sender<ToPage>,
}

/// Why a room ends.
#[derive(Debug)]
enum End {
    /// A participant left, or its page went away.
    Left,
    /// The call could not be allocated; both participants were told why.
    Failed,
    /// The server is stopping.
    Stopping,
}

impl Room {
    /// Handles one command; returns why the room ends, if it does.
    async fn handle(&mut self, command: Command, controller: &Controller) -> Option<End> {
        match command {
            Command::Join { peer, to_page } => {
                if self.peers.len() == 2 {
                    let message = "This room already has two participants.".into();
                    tell(&to_page, ToPage::Failed { message });
                    return None;
                }
                tell(&to_page, ToPage::Joined { peer: peer.clone() });
                self.peers.push(Peer { id: peer, to_page });
                if self.peers.len() == 2 {
                    return self.allocate(controller).await;
                }
                None
            }
            Command::Signal { peer, data } => {
                // Only between the room's two participants, and only once the call exists.
                if self.session.is_some()
                    && self.peers.iter().any(|p| p.id == peer)
                    && let Some(other) = self.peers.iter().find(|p| p.id != peer)
                {
                    tell(&other.to_page, ToPage::Signal { data });
                }
                None
            }
            Command::Leave { peer } => {
                let i = self.peers.iter().position(|p| p.id == peer)?;
                self.peers.remove(i);
                Some(End::Left)
            }
        }
    }

    /// Allocates the call for the two participants and gives each its own leg's servers.
    /// (Commands wait meanwhile: a participant who leaves during the allocation is handled
    /// next, and the session released.)
    async fn allocate(&mut self, controller: &Controller) -> Option<End> {
        match controller.allocate().await {
            Ok(call) => {
                info!(session = %call.session_id, "call allocated");
                for (i, (peer, ice_servers)) in self.peers.iter().zip(call.ice_servers).enumerate()
                {
                    let offerer = i == 0;
                    tell(
                        &peer.to_page,
                        ToPage::Call {
                            ice_servers,
                            offerer,
                        },
                    );
                }
                self.session = Some(call.session_id);
                None
            }
            Err(status) => {
                warn!(
                    code = controller::code_name(status.code()),
                    error = status.message(),
                    "AllocateSession failed"
                );
                let message = controller::explain(&status);
                for peer in &self.peers {
                    let message = message.clone();
                    tell(&peer.to_page, ToPage::Failed { message });
                }
                Some(End::Failed)
            }
        }
    }
}

/// Queues a message for a page. A page gone away leaves its room by itself (its stream's drop
/// says so), and one 256 messages behind is not reading: either way there is nothing better to
/// do than to drop the message.
fn tell(to_page: &mpsc::Sender<ToPage>, message: ToPage) {
    let _ = to_page.try_send(message);
}

/// One participant's place in a room: the stream of what the room tells its page. Dropping it
/// (the page closed its event stream, or its connection broke) leaves the room.
#[derive(Debug)]
pub(crate) struct Membership {
    from_room: mpsc::Receiver<ToPage>,
    leave: Option<(mpsc::Sender<Command>, String)>,
}

impl Stream for Membership {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.from_room.poll_recv(cx).map(|message| {
            message.map(|m| {
                let json = serde_json::to_string(&m).expect("plain data serialises");
                Ok(Event::default().data(json))
            })
        })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some((room, peer)) = self.leave.take() {
            // Drop cannot wait for the room's queue: a task delivers the Leave. A room that
            // already ended (it ended the stream) ignores it.
            tokio::spawn(async move {
                let _ = room.send(Command::Leave { peer }).await;
            });
        }
    }
}
