#!/usr/bin/env python3
"""A lossy, jittery link in userspace: what `tc netem loss L delay D J` does, on kernels without it.

The CI machines' kernel is built without sch_netem (CONFIG_NET_SCH_NETEM is not set), so the
chaos test bed routes the client host's traffic through this program instead: it creates a TUN
device in the router namespace it runs in, the router's policy routing sends every packet
between the client host and the rest of the test bed into that device, and this program writes
each one back (the kernel then routes it on) after a delay drawn uniformly from
[delay - jitter, delay + jitter], or drops it with probability `loss`, independently per packet
and per direction, as netem does. Packets may be reordered, as with netem's jitter.

The kernel hands a TUN device whole packets with their checksums computed (the device has no
offloads), so nothing here parses or fixes anything: packets are bytes.

    impair.py IFNAME --loss 0.01 --delay-ms 20 --jitter-ms 20 [--seed N]

Prints `ready` once the device exists, and on SIGTERM a JSON line with what it saw:
`{"in": packets read, "dropped": packets dropped, "out": packets written, "write_errors": writes
the kernel refused, "late_ms": the latest a packet was written after its due time}`.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ifname")
    p.add_argument("--loss", type=float, default=0.01, help="drop probability per packet")
    p.add_argument("--delay-ms", type=float, default=20.0, help="mean delay per packet")
    p.add_argument("--jitter-ms", type=float, default=20.0, help="delay varies uniformly by +- this")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    a = p.parse_args()
    if not 0 <= a.loss < 1 or a.delay_ms < 0 or not 0 <= a.jitter_ms <= a.delay_ms:
        sys.exit("impair.py: need 0 <= --loss < 1 and 0 <= --jitter-ms <= --delay-ms")
    rng = random.Random(a.seed)

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", a.ifname.encode(), IFF_TUN | IFF_NO_PI))
    stats = {"in": 0, "dropped": 0, "out": 0, "write_errors": 0, "late_ms": 0.0}
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)

    queue: list[tuple[float, int, bytes]] = []
    seq = 0
    lo, hi = (a.delay_ms - a.jitter_ms) / 1e3, (a.delay_ms + a.jitter_ms) / 1e3
    while running:
        now = time.monotonic()
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        if ready:
            # Everything queued in the device now, up to a bound so the writes keep up.
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                stats["in"] += 1
                if rng.random() < a.loss:
                    stats["dropped"] += 1
                    continue
                seq += 1
                heapq.heappush(queue, (now + rng.uniform(lo, hi), seq, pkt))
        while queue and queue[0][0] <= now:
            due, _, pkt = heapq.heappop(queue)
            stats["late_ms"] = max(stats["late_ms"], (now - due) * 1e3)
            try:
                os.write(fd, pkt)
                stats["out"] += 1
            except OSError:
                stats["write_errors"] += 1
    stats["late_ms"] = round(stats["late_ms"], 1)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
