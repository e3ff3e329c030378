#!/usr/bin/env python3
"""The kernel fast path on real hosts: real calls forwarded by the XDP program, as captured.

Run as root with the virtual environment's Python (deploy/check.sh step j):

    .venv/bin/python deploy/tests/xdp_netns.py

It builds veil-relay with the `xdp` feature (cargo, clang) and starts, each in a network
namespace of its own on one bridge (deploy/tests/cluster_netns.py's `Net`, 10.231.62.0/24): a
controller, a relay with `--xdp native --xdp-interfaces eth0`, and a client host with one
address per participant. Per ../shared/XDP-NOTES.md: the client's veth sends with tx checksum
offload off, and the relay's bridge port runs the object's pass-through program, so the
frames the relay's program sends back out of its veth (XDP_TX) are taken in.

Asserted, over `veil-loadtest` runs of 2-party UDP calls with real SRTP from the client host:

1. **Forwarded by the program**: `veil_relay_xdp_mode{mode="native"}` 1; while the calls run,
   the program holds both legs of every call (`veil_relay_xdp_legs`); it forwarded at least
   90% of what the relay forwarded (`veil_relay_xdp_packets_total{result="forwarded"}`
   against `veil_relay_forwarded_packets_total`, which counts both paths); 0 packets lost, 0
   decrypt failures, 0 datagrams from anywhere but the relay.
2. **Idle clocks**: the relay runs with `--leg-idle-secs 2` and the calls last 8 s: were the
   program's media not credited to the legs, every leg would be unbound as idle mid-call.
3. **The relay's own header**: a capture on the client host of every datagram from the relay
   (AF_PACKET): media the program forwarded, media the workers forwarded (before the program
   learned a peer's next hop) and the relay's own control messages (BIND_OK, KEEPALIVE_ACK)
   carry one and the same TTL, TOS and DF, and IP IDs that count up per participant as the
   kernel numbers a socket's datagrams; the UDP checksums verify; and no datagram reaching a
   participant has another participant's address in it.
4. **Revocation**: when the calls end (ReleaseSession), the program holds no leg within 1 s.
   **Expiry**: calls that outlive their sessions' TTL (`--ttl-secs 60`, the API's least): at
   the tokens' expiry the program hands their datagrams to the workers (which drop them as
   expired and unbind the legs), and holds no leg, and forwards nothing more, within 1 s.
5. **Rate limits**: with the controller's `--leg-max-pps 30` and 50 packets per second sent,
   the program drops what exceeds the ticket's rate (`result="rate_limited"`), the drops
   show in `veil_relay_dropped_packets_total{reason="rate_limited"}` too, and about 30% of
   the media is lost (20 of every 50 packets a second, less the one second of burst a bucket
   holds).

Every namespace, process, pin and file it creates is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chaos_netns import Proc  # noqa: E402
from cluster_netns import Net, die, http, metric, run  # noqa: E402
from veiltest import ROOT, TARGET, binary, log, stop  # noqa: E402

GRPC, OPS, UDP = 7000, 7001, 40000
CALLS = 4


def capture(iface: str, relay_ip: str, seconds: float) -> None:
    """(In the client's namespace.) Prints one JSON line per IPv4/UDP datagram from `relay_ip`
    seen on `iface` for `seconds`: its header fields, payload class, and whether its UDP
    checksum verifies."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((iface, 0))
    s.settimeout(0.2)
    relay = socket.inet_aton(relay_ip)
    end = time.monotonic() + seconds
    out = []
    while time.monotonic() < end:
        try:
            frame, addr = s.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        ip = frame[14:]
        if len(ip) < 28 or ip[9] != 17 or ip[12:16] != relay or ip[0] != 0x45:
            continue
        udp = ip[20:]
        length = struct.unpack("!H", udp[4:6])[0]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, length)
        data = pseudo + udp[:length] + (b"\0" if length % 2 else b"")
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        first = udp[8] if length > 8 else 0
        out.append({"tos": ip[1], "id": struct.unpack("!H", ip[4:6])[0], "frag": struct.unpack("!H", ip[6:8])[0],
                    "ttl": ip[8], "dst": socket.inet_ntoa(ip[16:20]), "media": 128 <= first <= 191 or 20 <= first <= 63,
                    "csum_ok": total == 0xFFFF, "payload": udp[8:length].hex()})
    print(json.dumps(out))


def build_relay(workdir: Path) -> tuple[Path, Path]:
    """veil-relay with the `xdp` feature, and the program's object (for the pass-through
    program on the bridge port), in `workdir`."""
    run("cargo", "build", "-q", "-p", "veil-relay", "--features", "xdp", "--bin", "veil-relay", timeout=900)
    exe = workdir / "veil-relay-xdp"
    shutil.copy2(TARGET / "veil-relay", exe)
    obj = workdir / "veil.bpf.o"
    arch = run("cc", "-dumpmachine").stdout.strip()
    run("clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
        str(ROOT / "relay" / "xdp" / "veil.bpf.c"), "-o", str(obj))
    return exe, obj


class Bed:
    def __init__(self, workdir: Path, relay_exe: Path, obj: Path, max_pps: int):
        self.workdir = workdir
        self.net = Net(62)
        self.ctl = self.net.host("xctl")
        self.relay = self.net.host("xr1")
        self.client = self.net.host("xcl")
        self.client_ips = [f"10.231.62.{100 + i}" for i in range(2 * CALLS)]
        for ip in self.client_ips:
            run("ip", "-n", self.client.ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        # The sender's veth must hand over complete checksums (XDP-NOTES.md); the relay's too,
        # so that the capture can verify what its socket sends as well.
        for h in (self.client, self.relay):
            run("ip", "netns", "exec", h.ns, "ethtool", "-K", "eth0", "tx", "off")
        # The relay's bridge port takes XDP_TX frames only with an XDP program of its own.
        self.pins = Path(f"/sys/fs/bpf/veil-xdp-test-{os.getpid()}")
        if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
            run("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
        run("bpftool", "prog", "loadall", str(obj), str(self.pins))
        port = f"p{self.net_index(self.relay)}"
        run("nsenter", f"--net=/run/netns/{self.net.hub}", "bpftool", "net", "attach", "xdp", "pinned",
            str(self.pins / "veil_pass"), "dev", port)
        keys = workdir / "keys.txt"
        keys.write_text(f"1 {secrets.token_hex(32)} signing\n")
        keys.chmod(0o600)
        self.url = f"http://{self.ctl.ip}:{GRPC}"
        self.controller = Proc("controller", self.ctl, [
            str(binary("veil-controller")), "--key-file", str(keys),
            "--grpc-addr", f"{self.ctl.ip}:{GRPC}", "--ops-addr", f"{self.ctl.ip}:{OPS}",
            "--allow-open-role", "signaling,relay", "--admin-tokens", secrets.token_urlsafe(24),
            "--leg-max-pps", str(max_pps)], workdir)
        self.relay_proc = Proc("relay", self.relay, [
            str(relay_exe), "--node-id", "relay-1", "--key-file", str(keys), "--controller", self.url,
            "--workers", "1", "--udp-addr", f"{self.relay.ip}:{UDP}", "--ops-addr", f"{self.relay.ip}:{OPS}",
            "--leg-idle-secs", "2", "--xdp", "native", "--xdp-interfaces", "eth0"], workdir)

    def net_index(self, host) -> int:
        return int(host.ip.rsplit(".", 1)[1])

    def start(self) -> None:
        self.controller.start()
        self.relay_proc.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            code, body = http(self.ctl, f"http://{self.ctl.ip}:{OPS}/metrics")
            if code == 200 and metric(body, "veil_controller_relays", state="up") >= 1:
                return
            time.sleep(0.2)
        die("the relay did not come up:\n" + self.relay_proc.tail())

    def metrics(self) -> str:
        code, body = http(self.relay, f"http://{self.relay.ip}:{OPS}/metrics", timeout=2)
        if code != 200:
            die(f"relay metrics: HTTP {code}\n{self.relay_proc.tail()}")
        return body

    def close(self) -> None:
        for p in (self.relay_proc, self.controller):
            p.stop()
        subprocess.run(["nsenter", f"--net=/run/netns/{self.net.hub}", "ip", "link", "set", "dev",
                        f"p{self.net_index(self.relay)}", "xdp", "off"], capture_output=True)
        self.net.close()
        shutil.rmtree(self.pins, ignore_errors=True)


def loadtest(bed: Bed, label: str, seconds: int, *extra: str, calls: int = CALLS) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", bed.client.ns, str(binary("veil-loadtest")), "--controller", bed.url,
            "--calls", str(calls), "--participants", "2", "--duration", f"{seconds}s", "--ramp-up", "20", *extra,
            "--transport", "udp", "--quiet", "--client-ip-pool", ",".join(bed.client_ips),
            "--report-json", str(bed.workdir / f"{label}.json")]
    return subprocess.Popen(argv, stdout=open(bed.workdir / f"{label}.log", "w"), stderr=subprocess.STDOUT)


def report(bed: Bed, proc: subprocess.Popen, label: str) -> dict:
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        stop(proc, "veil-loadtest")
        die(f"{label}: veil-loadtest ran past 150 s")
    path = bed.workdir / f"{label}.json"
    if not path.exists():
        die(f"{label}: no report:\n" + (bed.workdir / f"{label}.log").read_text(errors="replace")[-3000:])
    return json.loads(path.read_text())


def calls(bed: Bed) -> list[str]:
    failures = []
    # The capture first, so that it sees the binds' answers and the first media, which the
    # workers forward until the program has learned both peers' next hops.
    cap = subprocess.Popen(["ip", "netns", "exec", bed.client.ns, sys.executable, __file__, "--capture", "eth0",
                            bed.relay.ip, "6"], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    lt = loadtest(bed, "calls", 8)
    try:
        time.sleep(4)
        during = bed.metrics()
        out, _ = cap.communicate(timeout=30)
    except BaseException:
        stop(lt, "veil-loadtest")
        stop(cap, "capture")
        raise
    r = report(bed, lt, "calls")
    t = time.monotonic()
    while time.monotonic() - t < 1.0 and metric(bed.metrics(), "veil_relay_xdp_legs") > 0:
        time.sleep(0.05)
    revoked_after = time.monotonic() - t
    after = bed.metrics()
    xdp_fwd = metric(after, "veil_relay_xdp_packets_total", result="forwarded")
    all_fwd = metric(after, "veil_relay_forwarded_packets_total", transport="udp")
    log(f"calls: {r['calls']} calls, {r['calls_failed']} failed, {r['packets_lost']} of {r['packets_expected']} lost, "
        f"{r['decrypt_failures']} decrypt failures, {r['foreign_datagrams']} foreign; relay forwarded {all_fwd:.0f}, "
        f"of them the XDP program {xdp_fwd:.0f} ({xdp_fwd / max(all_fwd, 1) * 100:.1f}%); legs held mid-call "
        f"{metric(during, 'veil_relay_xdp_legs'):.0f}, after release {metric(after, 'veil_relay_xdp_legs'):.0f} "
        f"({revoked_after:.2f} s after the run ended)")
    if metric(after, "veil_relay_xdp_mode", mode="native") != 1:
        failures.append("veil_relay_xdp_mode{mode=\"native\"} is not 1")
    if r["calls_failed"] or r["packets_lost"] or r["decrypt_failures"] or r["foreign_datagrams"]:
        failures.append(f"calls: {r['calls_failed']} failed ({r.get('call_failures')}), {r['packets_lost']} lost, "
                        f"{r['decrypt_failures']} decrypt failures, {r['foreign_datagrams']} foreign")
    if metric(during, "veil_relay_xdp_legs") != 2 * CALLS:
        failures.append(f"mid-call the program held {metric(during, 'veil_relay_xdp_legs')} legs, not {2 * CALLS}")
    if xdp_fwd < 0.9 * all_fwd or all_fwd == 0:
        failures.append(f"the program forwarded {xdp_fwd:.0f} of {all_fwd:.0f} datagrams, not 90%")
    if metric(after, "veil_relay_xdp_legs") != 0:
        failures.append("the program still holds legs 1 s after every session was released")

    seen = json.loads(out)
    media = [p for p in seen if p["media"]]
    control = [p for p in seen if not p["media"]]
    fields = {(p["ttl"], p["tos"], p["frag"]) for p in seen}
    # IP IDs: the kernel numbers a socket's datagrams to one destination one by one from a
    # random start, and so does the program; consecutive datagrams to one participant step by
    # one, whichever path sent them, except where the two paths' counters meet.
    steps = ones = 0
    last: dict[str, int] = {}
    for p in seen:
        if p["dst"] in last:
            steps += 1
            ones += (p["id"] - last[p["dst"]]) % 65536 == 1
        last[p["dst"]] = p["id"]
    log(f"capture: {len(media)} media and {len(control)} control datagrams from the relay; header fields "
        f"(TTL, TOS, flags) {sorted(fields)}; IP ID one up from the previous datagram to that participant "
        f"{ones}/{steps}; checksums ok {sum(p['csum_ok'] for p in seen)}/{len(seen)}")
    if len(media) < 100 or not control:
        failures.append(f"capture: {len(media)} media, {len(control)} control datagrams: too few to judge")
    if len(fields) != 1:
        failures.append(f"capture: the relay's datagrams carry different header fields: {sorted(fields)}")
    elif next(iter(fields))[1] != 0 or next(iter(fields))[2] != 0x4000:
        failures.append(f"capture: TOS or DF not the relay socket's: {fields}")
    if ones < 0.9 * steps:
        failures.append(f"capture: IP IDs do not count up per participant ({ones}/{steps} steps of one)")
    if not all(p["csum_ok"] for p in seen):
        failures.append("capture: UDP checksums that do not verify")
    for p in seen:
        for ip in bed.client_ips:
            if socket.inet_aton(ip).hex() in p["payload"]:
                failures.append(f"capture: a datagram carries a participant's address {ip}")
                break
    return failures


def rate_limited(bed: Bed) -> list[str]:
    before = bed.metrics()
    r = report(bed, loadtest(bed, "limited", 5), "limited")
    after = bed.metrics()
    xdp = metric(after, "veil_relay_xdp_packets_total", result="rate_limited") - \
        metric(before, "veil_relay_xdp_packets_total", result="rate_limited")
    dropped = metric(after, "veil_relay_dropped_packets_total", reason="rate_limited") - \
        metric(before, "veil_relay_dropped_packets_total", reason="rate_limited")
    loss = r.get("loss_ratio") or 0
    log(f"limited to 30 packets/s: {r['packets_lost']} of {r['packets_expected']} lost ({loss * 100:.1f}%); "
        f"the program dropped {xdp:.0f} as rate_limited, the relay counts {dropped:.0f}")
    failures = []
    if xdp < 100 or dropped < xdp:
        failures.append(f"rate limits: the program dropped {xdp:.0f}, the relay counts {dropped:.0f}")
    # 20 of every 50 packets a second exceed the rate; the first second's burst passes.
    if not 0.2 < loss < 0.45:
        failures.append(f"rate limits: {loss * 100:.1f}% lost, not about 30%")
    return failures


def expiry(bed: Bed) -> list[str]:
    """Calls that outlive their sessions' 60 s TTL: at the tokens' expiry the program stops
    forwarding them (it hands their datagrams to the workers, which drop them as expired and
    unbind the legs), within a second."""
    calls, ttl = 2, 60
    t0 = time.monotonic()
    lt = loadtest(bed, "expiry", ttl + 4, "--ttl-secs", str(ttl), calls=calls)
    samples = []
    try:
        time.sleep(ttl - 3)
        while time.monotonic() - t0 < ttl + 3:
            m = bed.metrics()
            samples.append((time.monotonic() - t0, metric(m, "veil_relay_xdp_legs"),
                            metric(m, "veil_relay_xdp_packets_total", result="forwarded"),
                            metric(m, "veil_relay_xdp_packets_total", result="passed_expired")))
            time.sleep(0.1)
    except BaseException:
        stop(lt, "veil-loadtest")
        raise
    r = report(bed, lt, "expiry")
    after = bed.metrics()
    failures = []
    first = next((s for s in samples if s[3] > 0 or s[1] < 2 * calls), None)
    if samples[0][1] != 2 * calls or samples[0][2] == 0:
        failures.append(f"expiry: before the TTL the program held {samples[0][1]:.0f} legs and had forwarded "
                        f"{samples[0][2]:.0f}")
    if first is None:
        failures.append("expiry: nothing changed on the fast path at the sessions' expiry")
        return failures
    gone = next((s for s in samples if s[0] >= first[0] and s[1] == 0), None)
    # The program's counters reach the metrics at the relay's next harvest (every 250 ms):
    # compare from half a second after the legs went.
    settled = next((s for s in samples if gone and s[0] >= gone[0] + 0.5), samples[-1])
    forwarded_after = samples[-1][2] - settled[2]
    log(f"expiry: the program first handed an expired datagram to the workers {first[0]:.1f} s after the "
        f"calls started (TTL {ttl} s); held no leg {gone[0] - first[0] if gone else float('nan'):.2f} s later; "
        f"forwarded {forwarded_after:.0f} more from 0.5 s after that; {metric(after, 'veil_relay_dropped_packets_total', reason='expired'):.0f} "
        f"datagrams dropped as expired; the calls: {r['calls_failed']} ended early ({r.get('call_failures')})")
    if gone is None or gone[0] - first[0] > 1.0:
        failures.append("expiry: the program still held legs 1 s after the sessions expired")
    if forwarded_after:
        failures.append(f"expiry: the program forwarded {forwarded_after:.0f} datagrams after it held no leg")
    if metric(after, "veil_relay_dropped_packets_total", reason="expired") == 0:
        failures.append("expiry: the workers dropped nothing as expired")
    return failures


def main() -> None:
    if os.geteuid() != 0:
        die("xdp_netns.py creates network namespaces and loads XDP programs: run it as root")
    workdir = Path(tempfile.mkdtemp(prefix="veil-xdp-"))
    failures = []
    try:
        exe, obj = build_relay(workdir)
        for max_pps, scenario in ((5000, calls), (30, rate_limited), (5000, expiry)):
            bed = Bed(workdir, exe, obj, max_pps)
            try:
                bed.start()
                failures += scenario(bed)
            except BaseException:
                log(f"--- relay (last lines)\n{bed.relay_proc.tail()}")
                raise
            finally:
                bed.close()
        if failures:
            die("\n".join(failures))
        log("xdp: real calls through the kernel fast path, every check within its figures")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--capture":
        capture(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
