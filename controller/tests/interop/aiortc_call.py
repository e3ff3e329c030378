"""A relay-only WebRTC call between two aiortc peers through Veil's TURN, as a WebRTC app makes
it: each peer gets only its own leg's `ice_servers` (from AllocateSession), uses
`iceTransportPolicy: relay`, and the two exchange offer and answer in this process (the
signaling). Then a data channel echoes every message and an audio track flows both ways.

Prints one JSON line: per peer, the selected candidate pair's types and addresses, the echoed
message count, and the RTP packets each received; exits non-zero on any failure or timeout.

    python aiortc_call.py --legs '[{"ice_servers": [...]}, {"ice_servers": [...]}]' --messages 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
)
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcconfiguration import RTCIceTransportPolicy


def peer(leg: dict) -> RTCPeerConnection:
    servers = [RTCIceServer(urls=s["urls"], username=s["username"], credential=s["credential"])
               for s in leg["ice_servers"]]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers,
                                              iceTransportPolicy=RTCIceTransportPolicy.RELAY))


def selected_pair(pc: RTCPeerConnection) -> dict:
    # aiortc exposes the nominated pair through aioice, not getStats.
    ice = pc.sctp.transport.transport
    pair = ice._connection._nominated.get(1)  # component 1
    if pair is None:
        return {}
    return {"local": pair.local_candidate.type, "remote": pair.remote_candidate.type,
            "local_addr": f"{pair.local_candidate.host}:{pair.local_candidate.port}",
            "remote_addr": f"{pair.remote_candidate.host}:{pair.remote_candidate.port}"}


async def rtp_received(pc: RTCPeerConnection) -> int:
    stats = await pc.getStats()
    return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")


async def call(legs: list[dict], messages: int) -> dict:
    caller, callee = peer(legs[0]), peer(legs[1])
    caller.addTrack(AudioStreamTrack())
    callee.addTrack(AudioStreamTrack())
    channel = caller.createDataChannel("echo")
    echoed: asyncio.Queue[str] = asyncio.Queue()
    opened = asyncio.Event()

    @callee.on("datachannel")
    def on_datachannel(ch):
        @ch.on("message")
        def on_message(msg):
            ch.send(msg)  # the echo

    @channel.on("open")
    def on_open():
        opened.set()

    @channel.on("message")
    def on_echo(msg):
        echoed.put_nowait(msg)

    # Signaling: the SDP is all the two peers exchange, and with the relay policy it carries
    # relay candidates only.
    await caller.setLocalDescription(await caller.createOffer())
    await callee.setRemoteDescription(caller.localDescription)
    await callee.setLocalDescription(await callee.createAnswer())
    await caller.setRemoteDescription(callee.localDescription)
    for sdp in (caller.localDescription.sdp, callee.localDescription.sdp):
        for line in sdp.splitlines():
            if line.startswith("a=candidate") and " typ relay" not in line:
                raise SystemExit(f"a non-relay candidate in the SDP: {line}")

    await asyncio.wait_for(opened.wait(), 20)
    got = 0
    for i in range(messages):
        channel.send(f"message {i}")
        msg = await asyncio.wait_for(echoed.get(), 5)
        if msg != f"message {i}":
            raise SystemExit(f"echo {i} came back as {msg!r}")
        got += 1
    # Audio: let a second of 20 ms frames flow both ways.
    await asyncio.sleep(1.5)
    result = {
        "caller": {"pair": selected_pair(caller), "rtp_received": await rtp_received(caller)},
        "callee": {"pair": selected_pair(callee), "rtp_received": await rtp_received(callee)},
        "echoed": got,
    }
    await caller.close()
    await callee.close()
    return result


def main() -> None:
    if os.environ.get("VEIL_AIORTC_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    ap = argparse.ArgumentParser()
    ap.add_argument("--legs", required=True, help="JSON list of two legs' ice_servers")
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    legs = json.loads(a.legs)
    result = asyncio.run(asyncio.wait_for(call(legs, a.messages), a.timeout))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (asyncio.TimeoutError, TimeoutError):
        print("error: timed out", file=sys.stderr)
        sys.exit(2)
