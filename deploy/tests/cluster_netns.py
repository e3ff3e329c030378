#!/usr/bin/env python3
"""The shipped deployment, run as shipped: every container of the Kubernetes manifests and every
service of compose.yml, started from the environment its file gives it, as a cluster of
separate processes, each in its own network namespace with its own address, and a call put
through each cluster.

Run as root with the virtual environment's Python (PyYAML comes with yamllint):

    .venv/bin/python deploy/tests/cluster_netns.py

For each container it computes what the kubelet (or compose) would give it:
- the environment: `envFrom` ConfigMaps, `env` values with Kubernetes' `$(VAR)` expansion,
  downward-API fields (the pod's and node's names and addresses), Secret keys; compose's
  `environment`, YAML anchors merged, `${VAR:-default}` substituted with its default;
- Secret volumes as files at their mount paths, with the volume's mode and the pod's fsGroup
  (an overlay over /etc in the process's own mount namespace: nothing on this machine's /etc
  changes); the values are freshly generated for the keys `examples/secrets.yaml` lists (a key
  ring, tokens per role, a self-signed QUIC certificate), as deploy/README.md tells operators;
- the user (`runAsUser`/`USER` 65532) and the image's entrypoint binary, from target/debug;
- names: each Service and pod DNS name the manifests use, as /etc/hosts lines in that
  process's mount namespace (a headless Service resolves to every replica's address);
- the network: hosts in namespaces `veil-t<pid>-*` on one bridge in a hub namespace, with
  addresses of 10.231.0.0/16 that exist only there; relays (hostNetwork) get their node's
  address, controllers their pod's. Compose publishes ports on the host's 127.0.0.1; here, as
  docker's userland proxy does, a proxy in the client's namespace forwards 127.0.0.1:PORT to
  the service's address.

Then, for each cluster: `--check-config` with that environment must exit 0 (its redacted
output is printed); the processes start; the kubelet's probes (startup, readiness) must pass;
each controller must see every relay; each relay's announced TURN over TCP address must
answer a WebRTC client's first Allocate with 401 over the stream; and `veil-loadtest`, from a
client namespace, must put
calls over UDP and QUIC through every controller replica with media flowing and no failed
call. Every namespace, process and file it creates is removed at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from veiltest import DEPLOY, binary, log, stop  # noqa: E402

K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker" / "compose.yml"
PREFIX = f"veil-t{os.getpid() % 100000}"
CALL_SECONDS = 4


def die(msg: str) -> None:
    raise SystemExit(f"error: {msg}")


def run(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        die(f"{' '.join(args)}: exit {r.returncode}: {(r.stdout + r.stderr).strip()}")
    return r


# --- Secrets, generated as deploy/README.md tells operators to ---------------------------------


class SecretValues:
    """Fresh values for every key of every Secret in examples/secrets.yaml."""

    def __init__(self, workdir: Path):
        self.tokens: dict[str, str] = {}
        self.values: dict[str, dict[str, str]] = {}
        cert, key = workdir / "tls.crt", workdir / "tls.key"
        run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=veil-relay", "-keyout", str(key), "-out", str(cert))
        self.files = {"tls.crt": cert.read_text(), "tls.key": key.read_text(),
                      "keys.txt": f"1 {secrets.token_hex(32)} signing\n"}
        for doc in yaml.safe_load_all((K8S / "examples" / "secrets.yaml").read_text()):
            if doc and doc.get("kind") == "Secret":
                name = doc["metadata"]["name"]
                self.values[name] = {k: self.generate(name, k) for k in doc.get("stringData", {})}

    def token(self, role: str) -> str:
        return self.tokens.setdefault(role, f"{role}-{secrets.token_urlsafe(24)}")

    def generate(self, secret: str, key: str) -> str:
        if key in self.files:
            return self.files[key]
        if key.endswith("-tokens"):  # the role's accepted tokens: the one in use and a retired one
            return f"{self.token(key[:-7])},{self.token(key[:-7] + '-previous')}"
        if key.endswith("-token"):
            return self.token(key[:-6])
        die(f"Secret {secret} key {key}: cluster_netns.py does not know how to generate it; teach it")
        return ""

    def get(self, secret: str, key: str) -> str:
        if key not in self.values.get(secret, {}):
            die(f"Secret {secret} key {key} is used but not in deploy/kubernetes/examples/secrets.yaml")
        return self.values[secret][key]


# --- Network namespaces ------------------------------------------------------------------------


@dataclass
class Host:
    """A network namespace on the test's bridge, with one address."""

    ns: str
    ip: str


class Net:
    """A hub namespace with a bridge, and hosts on it; all removed by `close`."""

    def __init__(self, subnet: int):
        self.subnet = subnet
        self.hub = f"{PREFIX}-hub{subnet}"
        self.namespaces: list[str] = []
        self.add_ns(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        self.count = 0

    def add_ns(self, ns: str) -> None:
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")

    def host(self, name: str) -> Host:
        self.count += 1
        ns, ip = f"{PREFIX}-{name}"[:40], f"10.231.{self.subnet}.{self.count}"
        self.add_ns(ns)
        # Created in the hub, one end moved into the host: names only have to be unique there.
        inner, outer = f"h{self.count}", f"p{self.count}"
        run("ip", "-n", self.hub, "link", "add", outer, "type", "veth", "peer", "name", inner)
        run("ip", "-n", self.hub, "link", "set", inner, "netns", ns)
        run("ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up")
        run("ip", "-n", ns, "link", "set", inner, "name", "eth0")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        return Host(ns, ip)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# --- Containers as processes -------------------------------------------------------------------


@dataclass
class Container:
    """One container: its binary, environment, files and user, run in a host's namespace."""

    name: str
    host: Host
    binary: str
    env: dict[str, str]
    files: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # path: (content, mode, owner)
    uid: int = 65532
    gid: int = 65532
    hosts: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def argv(self, workdir: Path, *extra: str) -> list[str]:
        """The command that runs the binary as the container would: in the host's network
        namespace, in a mount namespace whose /etc has the Secret files and /etc/hosts."""
        root = workdir / self.name
        upper, work = root / "upper", root / "work"
        if not upper.exists():
            upper.mkdir(parents=True)
            work.mkdir()
            hosts = Path("/etc/hosts").read_text() + "".join(f"{line}\n" for line in self.hosts)
            (upper / "hosts").write_text(hosts)
            for path, (content, mode, owner) in self.files.items():
                if not path.startswith("/etc/"):
                    die(f"{self.name}: cluster_netns.py mounts Secrets under /etc only, not {path}")
                f = upper / path[len("/etc/"):]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(content)
                os.chown(f, owner, self.gid)
                f.chmod(mode)
            root.chmod(0o755)
        mount = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
                 ' && exec "$@"')
        return (["ip", "netns", "exec", self.host.ns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", mount, "sh", "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                 "--clear-groups", "env", "-i"]
                + [f"{k}={v}" for k, v in sorted(self.env.items())]
                + [str(binary(self.binary)), *extra])

    def check_config(self, workdir: Path) -> None:
        r = subprocess.run(self.argv(workdir, "--check-config"), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            die(f"{self.name}: `{self.binary} --check-config` with its shipped environment exited "
                f"{r.returncode}: {r.stderr.strip()}")
        log(f"  {self.name}: " + r.stdout.strip().replace("\n", "\n    "))

    def start(self, workdir: Path) -> None:
        self.log_path = workdir / f"{self.name}.log"
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.argv(workdir), stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, self.name)

    def tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])


def http(host: Host, url: str, timeout: float = 3) -> tuple[int, str]:
    """GET from inside a namespace: (status, body); 0 when nothing answered."""
    r = subprocess.run(["ip", "netns", "exec", host.ns, "curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}",
                        url], capture_output=True, text=True, timeout=timeout + 5)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


TURN_TCP_PROBE = r"""
import socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=3)
# Chromium's first Allocate: REQUESTED-TRANSPORT UDP, no credentials (28 bytes).
s.sendall(struct.pack("!HHI12sHHI", 0x0003, 8, 0x2112A442, b"veil-netns-1", 0x0019, 4, 17 << 24))
head = b""
while len(head) < 20:
    b = s.recv(20 - len(head))
    if not b:
        sys.exit("connection closed")
    head += b
ty, length = struct.unpack("!HH", head[:4])
body = b""
while len(body) < length:
    b = s.recv(length - len(body))
    if not b:
        sys.exit("connection closed")
    body += b
at = 0
while at + 4 <= len(body):
    t, n = struct.unpack("!HH", body[at:at + 4])
    if t == 0x0009:
        print(ty, body[at + 6] * 100 + body[at + 7])
        sys.exit(0)
    at += 4 + (n + 3) // 4 * 4
sys.exit(f"no ERROR-CODE in answer type {ty:#06x}")
"""


def turn_tcp_challenge(host: Host, addr: str) -> str:
    """Opens TURN over TCP to `addr` from inside a namespace and sends an unauthenticated
    Allocate, as a WebRTC client's first: the relay must answer 401 on the stream."""
    r = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c", TURN_TCP_PROBE, addr],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip() if r.returncode == 0 else f"failed: {r.stderr.strip() or r.stdout.strip()}"


def wait_until(what: str, cond, timeout: float, containers: list[Container]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in containers:
            if c.proc is not None and c.proc.poll() is not None:
                die(f"{c.name} exited {c.proc.returncode} while waiting for {what}:\n{c.tail()}")
        if cond():
            return
        time.sleep(0.3)
    die(f"timed out after {timeout:.0f}s waiting for {what}\n"
        + "\n".join(f"--- {c.name}\n{c.tail()}" for c in containers))


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def call(client: Host, controller_url: str, token: str, relay_ops: list[str], hosts: list[str],
         workdir: Path, label: str, uid: int = 65532) -> None:
    """Calls from `client` through the cluster behind `controller_url`; fails unless every call
    connected and media flowed both ways over UDP and QUIC."""
    lt = Container(f"loadtest-{label}", client, "veil-loadtest", {}, hosts=hosts, uid=uid, gid=uid)
    out = workdir / lt.name
    out.mkdir()
    os.chown(out, uid, uid)
    report = out / "report.json"
    argv = lt.argv(workdir, "--controller", controller_url, "--token", token, "--calls", "2",
                   "--duration", f"{CALL_SECONDS}s", "--transport", "mixed", "--quiet",
                   "--client-ip-pool", client.ip, "--relay-metrics", ",".join(relay_ops),
                   "--report-json", str(report))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=CALL_SECONDS + 60)
    if r.returncode != 0:
        die(f"{label}: veil-loadtest exited {r.returncode}:\n{(r.stdout + r.stderr).strip()[-3000:]}")
    data = json.loads(report.read_text())
    calls, failed = data.get("calls", 0), data.get("calls_failed")
    received, foreign = data.get("packets_received", 0), data.get("foreign_datagrams")
    if not calls or failed != 0 or not received or foreign != 0:
        die(f"{label}: calls through {controller_url} failed: {json.dumps(data)[:3000]}\n"
            f"{r.stderr.strip()[-2000:]}")
    log(f"  {label}: {calls} calls through {controller_url}, {received} packets received, "
        f"loss {data.get('loss_ratio', 0) * 100:.2f}%, none from anywhere but the relays")


# --- Kubernetes --------------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes, the rest stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def k8s_container(pod: str, host: Host, node: Host, workload: dict, configmaps: dict, values: SecretValues,
                  hosts: list[str]) -> Container:
    spec = workload["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    fields = {"metadata.name": pod, "metadata.namespace": workload["metadata"]["namespace"],
              "spec.nodeName": node.ns.removeprefix(PREFIX + "-"), "status.hostIP": node.ip,
              "status.podIP": host.ip, "spec.serviceAccountName": spec.get("serviceAccountName", "default")}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]])
        else:
            die(f"{pod}: envFrom {src}: not supported by cluster_netns.py")
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = k8s_expand(str(e["value"]), env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = values.get(ref["name"], ref["key"])
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]
        else:
            die(f"{pod}: env {e['name']}: not supported by cluster_netns.py")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files: dict[str, tuple[str, int, int]] = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        if "secret" not in v:
            die(f"{pod}: volume {m['name']}: only Secret volumes are supported by cluster_netns.py")
        name = v["secret"]["secretName"]
        for key, content in values.values.get(name, {}).items():
            # The kubelet writes Secret files as root, group fsGroup, with the volume's mode.
            files[f"{m['mountPath'].rstrip('/')}/{key}"] = (content, v["secret"].get("defaultMode", 0o644), 0)
    ctx = spec.get("securityContext", {})
    image = c["image"].split("/")[-1].split(":")[0]
    return Container(pod, host, image, env, files, uid=ctx.get("runAsUser", 0),
                     gid=ctx.get("fsGroup", ctx.get("runAsGroup", 0)), hosts=hosts)


def probe_url(container: dict, probe: str, host: Host) -> str:
    p = container[probe]["httpGet"]
    port = p["port"]
    if isinstance(port, str):
        port = next(x["containerPort"] for x in container["ports"] if x["name"] == port)
    return f"http://{host.ip}:{port}{p['path']}"


def kubernetes(workdir: Path, values: SecretValues) -> None:
    log("-- Kubernetes: deploy/kubernetes/*.yaml as processes")
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in load(f)]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    namespace = sts["metadata"]["namespace"]
    net = Net(1)
    containers: list[Container] = []
    try:
        replicas = sts["spec"]["replicas"]
        ctl_hosts = [net.host(f"{sts['metadata']['name']}-{i}") for i in range(replicas)]
        nodes = [net.host(f"node-{x}") for x in "ab"]
        client = net.host("client")
        # Cluster DNS: each controller pod under the StatefulSet's headless Service, the headless
        # Service itself (every replica), and the ClusterIP Service (here: the first replica).
        svc = sts["spec"]["serviceName"]
        hosts = []
        for i, h in enumerate(ctl_hosts):
            pod = f"{sts['metadata']['name']}-{i}"
            hosts.append(f"{h.ip} {pod}.{svc}.{namespace}.svc {pod}.{svc}.{namespace}.svc.cluster.local")
            hosts.append(f"{h.ip} {svc}.{namespace}.svc {svc}.{namespace}.svc.cluster.local")
        for name, s in services.items():
            if s["spec"].get("clusterIP") != "None":
                hosts.append(f"{ctl_hosts[0].ip} {name}.{namespace}.svc {name}.{namespace}.svc.cluster.local")
        # The controllers run on the relay nodes' machines in a real cluster; their node
        # address only matters to the relays (hostNetwork).
        for i, h in enumerate(ctl_hosts):
            containers.append(k8s_container(f"{sts['metadata']['name']}-{i}", h, nodes[i % len(nodes)], sts,
                                            configmaps, values, hosts))
        for n in nodes:
            # hostNetwork: the relay's namespace is its node's.
            containers.append(k8s_container(f"veil-relay-{n.ns[-1]}", n, n, ds, configmaps, values, hosts))
        log("  --check-config with each container's environment:")
        for c in containers:
            c.check_config(workdir)
        for c in containers:
            c.start(workdir)
        for c in containers:
            wl = sts if c.binary == "veil-controller" else ds
            spec = wl["spec"]["template"]["spec"]["containers"][0]
            for probe in ("startupProbe", "readinessProbe"):
                if probe in spec:
                    url = probe_url(spec, probe, c.host)
                    wait_until(f"{c.name} {probe} {url}", lambda u=url: http(client, u)[0] == 200, 40, containers)
        log(f"  {len(containers)} processes started; startup and readiness probes pass")
        ctl_spec = sts["spec"]["template"]["spec"]["containers"][0]
        for c in containers[:replicas]:
            url = probe_url(ctl_spec, "readinessProbe", c.host).rsplit("/", 1)[0] + "/metrics"
            wait_until(f"{c.name} to see both relays up",
                       lambda u=url: metric(http(client, u)[1], "veil_controller_relays", state="up") == len(nodes),
                       20, containers)
        log(f"  every controller replica sees {len(nodes)} relays up")
        # The replicas share their sessions (VEIL_CONTROLLER_PEERS names the headless Service,
        # which resolves to every replica, this one included): each follows every other one.
        ctl_metrics = [probe_url(ctl_spec, "readinessProbe", c.host).rsplit("/", 1)[0] + "/metrics"
                       for c in containers[:replicas]]
        for c, url in zip(containers[:replicas], ctl_metrics):
            wait_until(f"{c.name} to follow its {replicas - 1} peer replica(s)",
                       lambda u=url: metric(http(client, u)[1], "veil_controller_peers_up") == replicas - 1
                       and metric(http(client, u)[1], "veil_controller_peers") == replicas - 1,
                       20, containers)
        log(f"  every controller replica follows the other {replicas - 1}")
        # TURN over TCP on the address each relay announces: a WebRTC client's first Allocate
        # draws 401 (Allocate error response, 0x0113) over the stream.
        for c in containers:
            if c.binary == "veil-relay" and "VEIL_RELAY_PUBLIC_TURN_TCP_ADDR" in c.env:
                addr = c.env["VEIL_RELAY_PUBLIC_TURN_TCP_ADDR"]
                got = turn_tcp_challenge(client, addr)
                if got != f"{0x0113} 401":
                    die(f"{c.name}: TURN over TCP at {addr}: expected a 401 to an Allocate, got {got}")
                log(f"  {c.name}: TURN over TCP at {addr} answers an Allocate with 401")
        relay_spec = ds["spec"]["template"]["spec"]["containers"][0]
        relay_ops = [probe_url(relay_spec, "readinessProbe", n).split("/")[2] for n in nodes]
        grpc_port = next(p["containerPort"] for p in ctl_spec["ports"] if p["name"] == "grpc")
        token = values.token("signaling")
        for i in range(replicas):
            url = f"http://{sts['metadata']['name']}-{i}.{svc}.{namespace}.svc:{grpc_port}"
            call(client, url, token, relay_ops, hosts, workdir, f"kubernetes-{i}")
        # Every replica holds the sessions allocated through any of them.
        counts = [metric(http(client, u)[1], "veil_controller_sessions") for u in ctl_metrics]
        if min(counts) == 0 or len(set(counts)) != 1:
            die(f"the controller replicas do not hold the same sessions: {counts}")
        log(f"  every controller replica holds all {int(counts[0])} sessions, allocated through either")
    finally:
        for c in reversed(containers):
            c.stop()
        net.close()


# --- compose -----------------------------------------------------------------------------------


def compose_expand(value: str) -> str:
    """compose's `${VAR:-default}` and `${VAR}` with an empty environment; `$$` escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""
    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", sub, value)


class PortProxy:
    """Docker's userland proxy for ports published on 127.0.0.1: UDP and TCP, in a thread
    whose event loop runs inside the client's namespace (entered with setns)."""

    def __init__(self, ns: str, udp: dict[int, tuple[str, int]], tcp: dict[int, tuple[str, int]]):
        self.ns, self.udp, self.tcp = ns, udp, tcp
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.main, daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.error:
            die(f"port proxy: {self.error}")

    def main(self) -> None:
        try:
            with open(f"/run/netns/{self.ns}") as f:  # this thread only (os.setns is 3.12+)
                if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.serve())
            self.ready.set()
            self.loop.run_forever()
        except BaseException as e:  # reported by the constructor
            self.error = e
            self.ready.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for port, dst in self.udp.items():
            await loop.create_datagram_endpoint(lambda d=dst: UdpFront(d), local_addr=("127.0.0.1", port))
        for port, dst in self.tcp.items():
            await asyncio.start_server(lambda r, w, d=dst: tcp_pipe(r, w, d), "127.0.0.1", port)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class UdpFront(asyncio.DatagramProtocol):
    """One published UDP port: a socket toward the service per client address, as docker-proxy."""

    def __init__(self, dst: tuple[str, int]):
        self.dst, self.back = dst, {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        back = self.back.get(addr)
        if back is None:  # datagrams that arrive while its socket opens wait for it
            self.back[addr] = back = {"transport": None, "queue": [data]}
            asyncio.get_running_loop().create_task(self.open(addr, back))
        elif back["transport"] is None:
            back["queue"].append(data)
        else:
            back["transport"].sendto(data)

    async def open(self, addr, back: dict) -> None:
        front = self.transport

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _src) -> None:
                front.sendto(data, addr)

        t, _ = await asyncio.get_running_loop().create_datagram_endpoint(Back, remote_addr=self.dst)
        back["transport"] = t
        for data in back.pop("queue"):
            t.sendto(data)


async def tcp_pipe(reader, writer, dst: tuple[str, int]) -> None:
    try:
        r2, w2 = await asyncio.open_connection(*dst)
    except OSError:
        writer.close()
        return

    async def pump(r, w) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    await asyncio.gather(pump(reader, w2), pump(r2, writer))


def compose(workdir: Path, values: SecretValues) -> None:
    log("-- compose: deploy/docker/compose.yml services as processes")
    doc = yaml.safe_load(COMPOSE.read_text())  # PyYAML merges the `<<:` anchors
    veil = {name: s for name, s in doc["services"].items() if str(s.get("image", "")).startswith("veil-")}
    net = Net(2)
    containers: list[Container] = []
    proxy = None
    try:
        svc_hosts = {name: net.host(name) for name in veil}
        client = net.host("client")
        hosts = [f"{h.ip} {name}" for name, h in svc_hosts.items()]
        # The init service's volume `secrets`: the key ring and a self-signed certificate, owned
        # by 65532, keys 0400 and the certificate 0444 (compose.yml, service init).
        modes = {"keys.txt": 0o400, "tls.key": 0o400, "tls.crt": 0o444}
        udp: dict[int, tuple[str, int]] = {}
        tcp: dict[int, tuple[str, int]] = {}
        for name, s in veil.items():
            env = {k: compose_expand(str(v)) for k, v in s.get("environment", {}).items()}
            files = {}
            for vol in s.get("volumes", []):
                src, dst = vol.split(":")[:2]
                if src != "secrets":
                    die(f"{name}: volume {vol}: cluster_netns.py knows only the init service's `secrets`")
                for key, mode in modes.items():
                    files[f"{dst}/{key}"] = (values.files[key], mode, 65532)
            user = s.get("user", "65532:65532")
            uid, gid = (int(x) for x in user.split(":"))
            c = Container(f"compose-{name}", svc_hosts[name], s["image"].split(":")[0], env, files, uid, gid, hosts)
            containers.append(c)
            for p in s.get("ports", []):
                m = re.fullmatch(r"127\.0\.0\.1:(\d+):(\d+)(/udp|/tcp)?", p)
                if not m:
                    die(f"{name}: port {p}: compose.yml publishes on 127.0.0.1 only")
                (udp if m.group(3) == "/udp" else tcp)[int(m.group(1))] = (svc_hosts[name].ip, int(m.group(2)))
        log("  --check-config with each service's environment:")
        for c in containers:
            c.check_config(workdir)
        proxy = PortProxy(client.ns, udp, tcp)
        for c in containers:
            c.start(workdir)
        ctl = [c for c in containers if c.binary == "veil-controller"]
        relays = [c for c in containers if c.binary == "veil-relay"]
        ctl_ops = f"http://{ctl[0].host.ip}:{ctl[0].env['VEIL_CONTROLLER_OPS_ADDR'].rsplit(':', 1)[1]}"
        wait_until("the compose controller to see every relay up",
                   lambda: metric(http(client, ctl_ops + "/metrics")[1], "veil_controller_relays", state="up")
                   == len(relays), 40, containers)
        log(f"  {len(containers)} processes started; the controller sees {len(relays)} relays up")
        # TURN over TCP through each relay's published port, from the host, as WebRTC apps on
        # this machine reach it.
        for c in relays:
            addr = c.env["VEIL_RELAY_PUBLIC_TURN_TCP_ADDR"]
            got = turn_tcp_challenge(client, addr)
            if got != f"{0x0113} 401":
                die(f"{c.name}: TURN over TCP at {addr}: expected a 401 to an Allocate, got {got}")
        log(f"  TURN over TCP answers an Allocate with 401 on each relay's published port")
        # The compose header's own load-test command, from the host: 127.0.0.1 and the
        # published ports.
        header = COMPOSE.read_text()
        m = re.search(r"--token (\S+)", header)
        token = m.group(1) if m else die("compose.yml's header has no --token")
        ops = re.search(r"--relay-metrics (\S+)", header).group(1).split(",")
        call(client, "http://127.0.0.1:50051", token, ops, hosts, workdir, "compose", uid=0)
    finally:
        for c in reversed(containers):
            c.stop()
        if proxy:
            proxy.close()
        net.close()


def main() -> None:
    if os.geteuid() != 0:
        die("cluster_netns.py creates network namespaces: run it as root")
    for tool in ("ip", "unshare", "setpriv", "openssl", "curl"):
        if shutil.which(tool) is None:
            die(f"{tool} is missing")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="veil-netns-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        values = SecretValues(workdir)
        kubernetes(workdir, values)
        compose(workdir, values)
    log(f"shipped deployments ran as shipped in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
