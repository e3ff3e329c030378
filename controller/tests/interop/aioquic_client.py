#!/usr/bin/env python3
"""A Veil participant written with aioquic, a QUIC stack Veil did not write.

It implements docs/PROTOCOL.md from scratch: it computes the channel-bound BIND (ticket +
HMAC-SHA256 tag keyed by the leg key, over the message and the connection's TLS exporter value,
RFC 8446 section 7.5, which it derives itself from aioquic's key schedule: aioquic exports no
keying material) from the token, pins the relay's certificate by its SHA-256, binds on the first
bidirectional stream, then exchanges RFC 9221 datagrams through the relay: it echoes back the
first --echo media datagrams it receives and sends --send RTP-shaped datagrams of its own.

Prints "BOUND" once the relay accepted the leg, and a JSON summary on exit. Exit status 0 means
every step succeeded.
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import ssl
import struct
import sys

from aioquic import tls
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived, StreamDataReceived
from cryptography.hazmat.primitives.serialization import Encoding

TYPE_BIND, TYPE_BIND_OK, TYPE_ERROR = 0x50, 0x52, 0x5F
FLAG_CHANNEL = 2
EXPORTER_LABEL = b"EXPORTER-veil-bind"
SSRC = 0xA10C0DEC

# The exporter master secret (RFC 8446 section 7.1) of each TLS session, captured when aioquic
# derives the application traffic secrets: both use the transcript up to the server Finished.
_EXPORTER_MASTER = {}
_derive_secret = tls.KeySchedule.derive_secret


def _capturing_derive_secret(self, label):
    if label == b"s ap traffic":
        _EXPORTER_MASTER[id(self)] = (self.algorithm, _derive_secret(self, b"exp master"))
    return _derive_secret(self, label)


tls.KeySchedule.derive_secret = _capturing_derive_secret


def export_keying_material(schedule, label: bytes, context: bytes, length: int) -> bytes:
    """TLS-Exporter(label, context, length), RFC 8446 section 7.5."""
    from cryptography.hazmat.primitives import hashes

    algorithm, master = _EXPORTER_MASTER[id(schedule)]

    def digest(data: bytes) -> bytes:
        h = hashes.Hash(algorithm)
        h.update(data)
        return h.finalize()

    secret = tls.hkdf_expand_label(algorithm, master, label, digest(b""), algorithm.digest_size)
    return tls.hkdf_expand_label(algorithm, secret, b"exporter", digest(context), length)


def bind_message(token: bytes, exporter: bytes) -> bytes:
    """A channel-bound BIND, docs/PROTOCOL.md section 5: no cookie, flag 2, and a tag over the
    message and the connection's exporter value."""
    ticket, leg_key = token[:32], token[32:]
    txn = os.urandom(8)
    signed = bytes([TYPE_BIND, 1, 0, FLAG_CHANNEL]) + txn + ticket + bytes(24)
    tag = hmac.new(leg_key, signed + exporter, hashlib.sha256).digest()[:16]
    return signed + tag


class Veil(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.control = bytearray()
        self.bound = asyncio.get_event_loop().create_future()
        self.datagrams = asyncio.Queue()
        self.terminated = False

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self.control += event.data
            if not self.bound.done() and len(self.control) >= 12:
                kind = self.control[0]
                if kind == TYPE_BIND_OK and len(self.control) >= 16:
                    self.bound.set_result(True)
                elif kind == TYPE_ERROR:
                    code = struct.unpack("!H", self.control[2:4])[0]
                    self.bound.set_exception(RuntimeError(f"relay refused the bind: code {code}"))
        elif isinstance(event, DatagramFrameReceived):
            self.datagrams.put_nowait(event.data)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = True
            if not self.bound.done():
                self.bound.set_exception(RuntimeError(f"connection closed: {event.reason_phrase}"))


def rtp(seq: int) -> bytes:
    header = struct.pack("!BBHII", 0x80, 96, seq, seq * 3000, SSRC)
    return header + f"aioquic datagram {seq}".encode()


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert-sha256", required=True, help="hex SHA-256 of the relay certificate")
    p.add_argument("--token", required=True, help="hex leg token")
    p.add_argument("--echo", type=int, default=0)
    p.add_argument("--send", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0)
    a = p.parse_args()

    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=["veil/2"],
        max_datagram_frame_size=65536,
        server_name="veil-relay",
        # No CA: the certificate is pinned by its fingerprint below, as the Veil API hands it out.
        verify_mode=ssl.CERT_NONE,
    )
    summary = {"bound": False, "pinned": False, "echoed": 0, "sent": 0, "received": 0}
    async with connect(a.host, a.port, configuration=config, create_protocol=Veil, wait_connected=True) as conn:
        cert = conn._quic.tls._peer_certificate
        der = cert.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != a.cert_sha256:
            print("certificate does not match the pinned fingerprint", file=sys.stderr)
            return 3
        summary["pinned"] = True

        exporter = export_keying_material(conn._quic.tls.key_schedule, EXPORTER_LABEL, b"", 32)
        stream = conn._quic.get_next_available_stream_id()
        conn._quic.send_stream_data(
            stream, bind_message(bytes.fromhex(a.token), exporter), end_stream=False
        )
        conn.transmit()
        await asyncio.wait_for(conn.bound, timeout=5)
        summary["bound"] = True
        print("BOUND", flush=True)

        deadline = asyncio.get_event_loop().time() + a.timeout
        seq = 0
        while summary["echoed"] < a.echo or summary["sent"] < a.send:
            if asyncio.get_event_loop().time() > deadline or conn.terminated:
                break
            if summary["sent"] < a.send:
                conn._quic.send_datagram_frame(rtp(seq))
                seq += 1
                summary["sent"] += 1
                conn.transmit()
            try:
                data = await asyncio.wait_for(conn.datagrams.get(), timeout=0.01)
            except asyncio.TimeoutError:
                continue
            summary["received"] += 1
            if summary["echoed"] < a.echo and 128 <= data[0] <= 191:
                conn._quic.send_datagram_frame(data)
                summary["echoed"] += 1
                conn.transmit()
        # Let the last datagrams leave before closing.
        await asyncio.sleep(0.2)
    print(json.dumps(summary), flush=True)
    ok = summary["bound"] and summary["pinned"] and summary["echoed"] == a.echo and summary["sent"] == a.send
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
