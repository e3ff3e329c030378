#!/usr/bin/env python3
"""Consistency checks across deploy/: the things no schema validator can see.

Run with the virtual environment's Python (it needs PyYAML, which yamllint brings):

    .venv/bin/python deploy/tests/check_config.py

It checks that
- every VEIL_* variable the Kubernetes manifests and compose.yml give a container is one that
  binary's `--help` documents (QUIC variables still in flight on another branch are reported as
  pending, by name, until the binary documents them), and that compose gives each binary the same
  variables as Kubernetes;
- addresses and ports agree everywhere: ConfigMaps, downward-API env, container ports, Prometheus
  annotations, Dockerfile EXPOSE, compose;
- VEIL_RELAY_CONTROLLERS names exactly the StatefulSet's replicas under its headless Service;
- the relays' grace period covers their drain deadline; probes point at the right ports;
- every Secret and key a pod uses exists in examples/secrets.yaml, and file paths in VEIL_*
  variables lie in the mounted Secret volumes;
- the Kubernetes scrape config, applied (relabelling simulated) to the pods the manifests
  create, yields exactly one target per pod on its ops port, in the right job; and that
  `promtool check config` accepts both Prometheus configurations (see NOTE below);
- the Grafana dashboard is well-formed and provisioned where compose mounts it;
- the NetworkPolicy admits exactly what it says (signaling namespaces, relay nodes, monitoring)
  on ports the controller has; every role of every shipped controller has tokens;
- every alert has a runbook_url naming a section of docs/OPERATIONS.md that exists;
- the optional objects of examples/: the relay pool differs from 40-relay.yaml and 20-config.yaml
  only where a pool must, and the prometheus-operator objects (custom resources, which
  kubernetes-validate has no schema for and check.sh step c therefore leaves out) select the
  shipped pods, keep the job names, and carry exactly the rules of alerts.yml;
- the image build strips the binaries.

`--write-prometheus-rule` regenerates examples/prometheus-operator/prometheus-rule.yaml from
deploy/prometheus/alerts.yml instead of checking.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from veiltest import DEPLOY, binary, log  # noqa: E402

K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
OPERATOR = K8S / "examples" / "prometheus-operator"
RULE_FILE = OPERATOR / "prometheus-rule.yaml"


class LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL) as literal blocks, as alerts.yml has them."""


LiteralDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def prometheus_rule_text() -> str:
    """examples/prometheus-operator/prometheus-rule.yaml, generated from alerts.yml."""
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "veil", "namespace": "veil", "labels": {"app.kubernetes.io/part-of": "veil"}},
        "spec": {"groups": groups},
    }
    header = (
        "# EXAMPLE, for the prometheus-operator: the rules of deploy/prometheus/alerts.yml as a\n"
        "# PrometheusRule (see pod-monitors.yaml next to this file). GENERATED: do not edit; change\n"
        "# alerts.yml and run `.venv/bin/python deploy/tests/check_config.py --write-prometheus-rule`\n"
        "# (check_config.py fails while the two differ).\n"
    )
    return header + yaml.dump(rule, Dumper=LiteralDumper, sort_keys=False, width=100, allow_unicode=True)


if sys.argv[1:] == ["--write-prometheus-rule"]:
    RULE_FILE.write_text(prometheus_rule_text())
    log(f"wrote {RULE_FILE.relative_to(DEPLOY.parent)}")
    sys.exit(0)

# Variables of the relay's QUIC listener, which another branch is adding. They are checked
# like every other variable as soon as `veil-relay --help` documents them.
PENDING = {
    "veil-relay": {"VEIL_RELAY_QUIC_ADDR", "VEIL_RELAY_QUIC_CERT_FILE", "VEIL_RELAY_QUIC_KEY_FILE"},
    "veil-controller": set(),
}

errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def port_of(addr: str) -> int:
    m = re.fullmatch(r"(?:\[[0-9a-fA-F:.]*\]|[^:\[\]]+):(\d+)", addr)
    if not m:
        raise ValueError(f"not an address with a port: {addr!r}")
    return int(m.group(1))


def documented_env(name: str) -> set[str]:
    out = subprocess.run([str(binary(name)), "--help"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        fail(f"{name} --help exited with {out.returncode}")
    names = set(re.findall(r"\[env: (VEIL_[A-Z0-9_]+)", out.stdout))
    if not names:
        fail(f"{name} --help documents no VEIL_* variable: cannot check names")
    return names


# --- the manifests ------------------------------------------------------------------------------

docs: list[tuple[Path, dict]] = []
for path in sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml")):
    docs += [(path, d) for d in load_all(path)]


def find(kind: str, name: str | None = None) -> list[dict]:
    return [d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str) -> dict:
    found = find(kind, name)
    if len(found) != 1:
        raise SystemExit(f"error: expected one {kind} {name}, found {len(found)}")
    return found[0]


NAMESPACE = one("Namespace", "veil")["metadata"]["name"]
CLUSTER_SCOPED = ("Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding")
for path, d in docs:
    if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != NAMESPACE:
        fail(f"{path.name}: {d['kind']} {d['metadata']['name']} is not in namespace {NAMESPACE}")

sts = one("StatefulSet", "veil-controller")
ds = one("DaemonSet", "veil-relay")
workloads = {"veil-controller": sts, "veil-relay": ds}


def container(w: dict, name: str) -> dict:
    cs = [c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    if len(cs) != 1:
        raise SystemExit(f"error: {w['kind']} {w['metadata']['name']} has no container {name}")
    return cs[0]


def k8s_env(binary_name: str) -> dict[str, str | None]:
    """VEIL_* and other variables the container gets: name -> literal value (None if from a
    Secret or the downward API)."""
    c = container(workloads[binary_name], binary_name)
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            cm = one("ConfigMap", src["configMapRef"]["name"])
            env.update(cm["data"])
        else:
            fail(f"{binary_name}: envFrom other than a ConfigMap is not checked: {src}")
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def expand(value: str, env: dict[str, str | None]) -> str:
    """Kubernetes $(VAR) expansion, with downward-API values replaced by a sample address."""
    def sub(m: re.Match) -> str:
        v = env.get(m.group(1))
        return v if v is not None else "192.0.2.10"
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


env_k8s = {b: k8s_env(b) for b in workloads}

# ConfigMaps nobody loads are settings that silently do nothing (example workloads included).
used_cms = {src["configMapRef"]["name"] for w in find("DaemonSet") + find("StatefulSet")
            for c in w["spec"]["template"]["spec"]["containers"] for src in c.get("envFrom", [])}
for cm in find("ConfigMap"):
    if cm["metadata"]["name"] not in used_cms:
        fail(f"ConfigMap {cm['metadata']['name']} is loaded by no container")

# --- compose ------------------------------------------------------------------------------------

compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
compose_env: dict[str, list[tuple[str, dict]]] = {"veil-relay": [], "veil-controller": []}
for svc_name, svc in compose["services"].items():
    image = svc.get("image", "")
    for b in compose_env:
        if image.split(":")[0] == b:
            compose_env[b].append((svc_name, {k: str(v) for k, v in svc.get("environment", {}).items()}))
            target = svc.get("build", {}).get("target")
            if target != b:
                fail(f"compose service {svc_name}: builds target {target!r}, image is {image}")
            k8s_image = container(workloads[b], b)["image"]
            if k8s_image != image:
                fail(f"compose service {svc_name} uses image {image}, Kubernetes {k8s_image}")
if len(compose_env["veil-relay"]) != 3 or len(compose_env["veil-controller"]) != 1:
    fail(f"compose.yml should run one controller and three relays: "
         f"{ {b: [s for s, _ in v] for b, v in compose_env.items()} }")

# --- variable names against --help ----------------------------------------------------------------

log("  VEIL_* variables against --help:")
for b in workloads:
    documented = documented_env(b)
    k8s_names = {n for n in env_k8s[b] if n.startswith("VEIL_")}
    pending_seen = set()
    for where, names in [(f"Kubernetes {b}", k8s_names)] + [
            (f"compose {s}", {n for n in e if n.startswith("VEIL_")}) for s, e in compose_env[b]]:
        for n in sorted(names - documented):
            if n in PENDING[b]:
                pending_seen.add(n)
            else:
                fail(f"{where}: {n} is not a variable `{b} --help` documents")
        for n in sorted(set(env_k8s[b]) - k8s_names if where.startswith("Kubernetes") else ()):
            # Helper variables (HOST_IP) must feed a VEIL_* value.
            if not any(f"$({n})" in (v or "") for v in env_k8s[b].values()):
                fail(f"{where}: {n} is set but no VEIL_* variable uses it")
    for s, e in compose_env[b]:
        cnames = {n for n in e if n.startswith("VEIL_")}
        if cnames != k8s_names:
            fail(f"compose {s} and Kubernetes {b} set different variables: "
                 f"only compose {sorted(cnames - k8s_names)}, only Kubernetes {sorted(k8s_names - cnames)}")
    checked = len(k8s_names - pending_seen)
    log(f"    {b}: {checked} variables documented by --help"
        + (f"; pending (QUIC, not yet in --help): {', '.join(sorted(pending_seen))}" if pending_seen else ""))
    for n in sorted(PENDING[b] & documented):
        log(f"    {b}: {n} is now documented by --help (no longer pending)")

# --- addresses and ports --------------------------------------------------------------------------

dockerfile = (DOCKER / "Dockerfile").read_text()


def exposed(stage: str) -> set[tuple[int, str]]:
    m = re.search(rf"AS {re.escape(stage)}\n(.*?)(?:\nFROM |\Z)", dockerfile, re.S)
    if not m:
        fail(f"Dockerfile has no stage {stage}")
        return set()
    out = set()
    for line in m.group(1).splitlines():
        if line.startswith("EXPOSE "):
            for p in line.split()[1:]:
                num, _, proto = p.partition("/")
                out.add((int(num), (proto or "tcp").upper()))
    return out


# (binary, VEIL_* address variable, container port name, protocol)
ADDRS = [
    ("veil-relay", "VEIL_RELAY_UDP_ADDR", "media", "UDP"),
    ("veil-relay", "VEIL_RELAY_QUIC_ADDR", "quic", "UDP"),
    ("veil-relay", "VEIL_RELAY_OPS_ADDR", "ops", "TCP"),
    ("veil-controller", "VEIL_CONTROLLER_GRPC_ADDR", "grpc", "TCP"),
    ("veil-controller", "VEIL_CONTROLLER_OPS_ADDR", "ops", "TCP"),
]
for b, var, port_name, proto in ADDRS:
    c = container(workloads[b], b)
    ports = {p["name"]: p for p in c["ports"]}
    value = env_k8s[b].get(var)
    if value is None:
        fail(f"Kubernetes {b}: {var} is not set")
        continue
    port = port_of(expand(value, env_k8s[b]))
    cp = ports.get(port_name)
    if cp is None or cp["containerPort"] != port or cp.get("protocol", "TCP") != proto:
        fail(f"Kubernetes {b}: {var}={value} but container port {port_name!r} is {cp}")
    if (port, proto) not in exposed(b):
        fail(f"Dockerfile stage {b} does not EXPOSE {port}/{proto.lower()} ({var})")
    for s, e in compose_env[b]:
        if var in e and port_of(e[var]) != port:
            fail(f"compose {s}: {var}={e[var]}, Kubernetes uses port {port}")
    if port_name == "ops":
        ann = workloads[b]["spec"]["template"]["metadata"]["annotations"]
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(port):
            fail(f"Kubernetes {b}: prometheus.io annotations {ann} do not match ops port {port}")
        if ann.get("prometheus.io/path") != "/metrics":
            fail(f"Kubernetes {b}: prometheus.io/path should be /metrics")

# The relay announces the node's address with its media port.
public = expand(env_k8s["veil-relay"].get("VEIL_RELAY_PUBLIC_UDP_ADDR") or "", env_k8s["veil-relay"])
if port_of(public) != port_of(env_k8s["veil-relay"]["VEIL_RELAY_UDP_ADDR"]):
    fail(f"VEIL_RELAY_PUBLIC_UDP_ADDR {public} is not on the media port")
host_ip = [e for e in container(ds, "veil-relay")["env"] if e["name"] == "HOST_IP"]
if not host_ip or host_ip[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.hostIP":
    fail("HOST_IP must come from the downward API (status.hostIP)")
ds_spec = ds["spec"]["template"]["spec"]
if not ds_spec.get("hostNetwork") or ds_spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
    fail("relays need hostNetwork: true and dnsPolicy: ClusterFirstWithHostNet")
if ds["spec"]["updateStrategy"].get("rollingUpdate", {}).get("maxSurge", 0) not in (0, "0"):
    fail("relay rolling updates must not surge: two relays would share the UDP port (SO_REUSEPORT)")
log("  addresses and ports agree across ConfigMaps, env, container ports, annotations, "
    "Dockerfile EXPOSE and compose")

# --- controllers: replicas, Services, relay URLs --------------------------------------------------

replicas = sts["spec"]["replicas"]
svc_name = sts["spec"]["serviceName"]
headless = one("Service", svc_name)
grpc_port = [p for p in container(sts, "veil-controller")["ports"] if p["name"] == "grpc"][0]["containerPort"]
if replicas < 2:
    fail(f"the controller StatefulSet has {replicas} replicas; at least 2")
if headless["spec"].get("clusterIP") != "None" or not headless["spec"].get("publishNotReadyAddresses"):
    fail(f"Service {svc_name} must be headless and publish not-ready addresses")
pod_labels = sts["spec"]["template"]["metadata"]["labels"]
for s in find("Service"):
    sel = s["spec"].get("selector", {})
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        fail(f"Service {s['metadata']['name']} selects no controller pod: {sel}")
    for p in s["spec"]["ports"]:
        if p["targetPort"] not in ("grpc", grpc_port):
            fail(f"Service {s['metadata']['name']} targets port {p['targetPort']}")
# Relays find every replica through the headless Service's name (all its pods' addresses),
# resolved again periodically: one URL, whatever the number of replicas.
urls = env_k8s["veil-relay"]["VEIL_RELAY_CONTROLLERS"].split(",")
want = [f"http://{svc_name}.{NAMESPACE}.svc:{grpc_port}"]
for u in urls:
    if not re.fullmatch(r"https?://[^\s,]+", u):
        fail(f"VEIL_RELAY_CONTROLLERS entry {u!r} is not a URL veil-relay accepts")
if urls != want:
    fail(f"VEIL_RELAY_CONTROLLERS is {urls}; it must be the headless Service's name, {want}")
resolve = env_k8s["veil-relay"].get("VEIL_RELAY_CONTROLLER_RESOLVE_SECS")
if resolve is None or not 1 <= int(resolve) <= 60:
    fail(f"VEIL_RELAY_CONTROLLER_RESOLVE_SECS={resolve}: relays should re-resolve the controllers "
         f"at least every minute")
for pdb in find("PodDisruptionBudget"):
    sel = pdb["spec"]["selector"]["matchLabels"]
    if any(pod_labels.get(k) != v for k, v in sel.items()):
        fail(f"PodDisruptionBudget {pdb['metadata']['name']} selects no controller pod")
    if pdb["spec"].get("minAvailable", 0) >= replicas:
        fail("the controllers' PodDisruptionBudget would block every voluntary disruption")
log(f"  VEIL_RELAY_CONTROLLERS is the headless Service {svc_name}: every one of the {replicas} replicas")

# --- drain, probes --------------------------------------------------------------------------------

drain = int(env_k8s["veil-relay"]["VEIL_RELAY_DRAIN_DEADLINE_SECS"])
grace = ds_spec["terminationGracePeriodSeconds"]
if grace < drain + 5:
    fail(f"relay terminationGracePeriodSeconds {grace} does not cover the drain deadline {drain}s + 5s")
for s, e in compose_env["veil-relay"]:
    svc = compose["services"][s]
    g = svc.get("stop_grace_period", "10s")
    secs = int(g.rstrip("s")) if re.fullmatch(r"\d+s", g) else -1
    if int(e.get("VEIL_RELAY_DRAIN_DEADLINE_SECS", 30)) + 5 > secs:
        fail(f"compose {s}: stop_grace_period {g} does not cover the drain deadline")
for b, w in workloads.items():
    c = container(w, b)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = c.get(probe)
        if p is None:
            fail(f"{b}: no {probe}")
            continue
        if "httpGet" in p:
            if p["httpGet"]["port"] not in ("ops", ports["ops"]):
                fail(f"{b} {probe}: HTTP on port {p['httpGet']['port']}, not the ops port")
            if p["httpGet"]["path"] not in ("/healthz", "/readyz"):
                fail(f"{b} {probe}: path {p['httpGet']['path']}")
        elif "grpc" in p:
            if p["grpc"]["port"] != ports.get("grpc"):
                fail(f"{b} {probe}: gRPC probe on {p['grpc']['port']}, not the gRPC port")
    if c["readinessProbe"].get("httpGet", {}).get("path") != "/readyz":
        fail(f"{b}: readiness must be /readyz")
liveness = container(sts, "veil-controller")["livenessProbe"]
if "grpc" not in liveness:
    fail("the controller's liveness probe should be the gRPC health check")
# The overall status ("") and SessionService follow readiness (NOT_SERVING with no relay): a
# liveness probe on them would restart every replica that waits for its first relay.
elif liveness["grpc"].get("service") != "veil.v1.RelayRegistry":
    fail(f"the controller's gRPC liveness probe asks for {liveness['grpc'].get('service', '')!r}; "
         f"it must ask for veil.v1.RelayRegistry, whose status does not follow readiness")
log(f"  relay grace period {grace}s covers the {drain}s drain; probes on the right ports")

# --- Secrets and mounted files --------------------------------------------------------------------

secrets = {s["metadata"]["name"]: s for s in find("Secret")}
for b, w in workloads.items():
    spec = w["spec"]["template"]["spec"]
    c = container(w, b)
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            s = secrets.get(ref["name"])
            if s is None or ref["key"] not in s.get("stringData", {}):
                fail(f"{b}: {e['name']} reads Secret {ref['name']} key {ref['key']}, "
                     f"which examples/secrets.yaml does not define")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
    for var, value in env_k8s[b].items():
        if var.startswith("VEIL_") and var.endswith("_FILE") and value:
            d, _, f = value.rpartition("/")
            v = mounts.get(d)
            if v is None or "secret" not in v:
                fail(f"{b}: {var}={value} is not in a mounted Secret volume")
                continue
            s = secrets.get(v["secret"]["secretName"])
            if s is None or f not in s.get("stringData", {}):
                fail(f"{b}: {var}={value}: Secret {v['secret']['secretName']} has no key {f}")
log("  every Secret, key and mounted file the pods use is defined")

# --- Prometheus: the Kubernetes scrape config against the manifests' pods -------------------------


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus relabelling (replace, keep, drop), enough for deploy/prometheus."""
    labels = dict(labels)
    for r in rules:
        action = r.get("action", "replace")
        value = r.get("separator", ";").join(labels.get(s, "") for s in r.get("source_labels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            repl = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))) or "",
                          r.get("replacement", "$1"))
            if repl:
                labels[r["target_label"]] = repl
            else:
                labels.pop(r["target_label"], None)
        elif action not in ("replace", "keep", "drop"):
            raise SystemExit(f"error: relabel action {action} is not simulated")
    return labels


def sd_targets(w: dict, pod: str, ip: str) -> list[dict[str, str]]:
    """What Kubernetes pod discovery yields for one pod of `w`: one target per container port."""
    t = w["spec"]["template"]
    out = []
    for c in t["spec"]["containers"]:
        for p in c.get("ports", []):
            labels = {
                "__address__": f"{ip}:{p['containerPort']}",
                "__meta_kubernetes_namespace": NAMESPACE,
                "__meta_kubernetes_pod_name": pod,
                "__meta_kubernetes_pod_node_name": "node-a",
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_pod_container_name": c["name"],
                "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP"),
            }
            for k, v in t["metadata"].get("labels", {}).items():
                labels["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
            for k, v in t["metadata"].get("annotations", {}).items():
                labels["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
            out.append(labels)
    return out


prom_k8s = yaml.safe_load((PROM / "prometheus.yml").read_text())
jobs = {j["job_name"]: j for j in prom_k8s["scrape_configs"]}
if set(jobs) != set(workloads):
    fail(f"deploy/prometheus/prometheus.yml jobs {sorted(jobs)}; expected {sorted(workloads)}")
pods = [("veil-controller", sts, f"veil-controller-{i}", f"10.1.0.{i + 1}") for i in range(replicas)]
pods += [("veil-relay", ds, f"veil-relay-{x}", f"10.0.1.{i + 1}") for i, x in enumerate("abc")]
for job_name, job in jobs.items():
    got = []
    for b, w, pod, ip in pods:
        for sd in job["kubernetes_sd_configs"]:
            if sd.get("role") != "pod" or NAMESPACE not in sd.get("namespaces", {}).get("names", []):
                fail(f"job {job_name}: discovery must be role pod in namespace {NAMESPACE}")
            selected = True
            for sel in sd.get("selectors", []):
                k, _, v = sel["label"].partition("=")
                selected &= w["spec"]["template"]["metadata"]["labels"].get(k) == v
            if not selected:
                continue
            for target in sd_targets(w, pod, ip):
                res = relabel(target, job.get("relabel_configs", []))
                if res is not None:
                    got.append((b, pod, res))
    expected_pods = [(b, pod) for b, _, pod, _ in pods if b == job_name]
    if sorted((b, p) for b, p, _ in got) != sorted(expected_pods):
        fail(f"job {job_name}: relabelled targets {[(b, p) for b, p, _ in got]}, expected one per pod "
             f"{expected_pods}")
    for b, pod, res in got:
        ann = workloads[b]["spec"]["template"]["metadata"]["annotations"]
        if res["__address__"].rsplit(":", 1)[1] != ann["prometheus.io/port"]:
            fail(f"job {job_name}: {pod} scraped at {res['__address__']}, not its ops port")
        if res.get("__metrics_path__", "/metrics") != "/metrics" or res.get("pod") != pod:
            fail(f"job {job_name}: {pod}: unexpected labels {res}")
log(f"  deploy/prometheus/prometheus.yml, relabelled over the manifests' pods: one target per pod "
    f"on its ops port ({', '.join(sorted(jobs))})")

# Job names the alerts and the dashboard select on exist in both scrape configs.
prom_compose = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
compose_jobs = {j["job_name"] for j in prom_compose["scrape_configs"]}
referenced = set(re.findall(r'job=~?"([^"]+)"', (PROM / "alerts.yml").read_text()))
for dash in (GRAFANA / "dashboards").glob("*.json"):
    for m in re.findall(r'job=~?\\"([^"\\]+)\\"', dash.read_text()):
        referenced.update(m.split("|"))
for name in sorted(referenced):
    if name not in jobs or name not in compose_jobs:
        fail(f"job {name!r} is used by alerts or dashboard but not scraped by both Prometheus configs")
compose_targets = sorted(t for j in prom_compose["scrape_configs"] for sc in j["static_configs"]
                         for t in sc["targets"])
want_targets = sorted([f"{s}:{port_of(e['VEIL_RELAY_OPS_ADDR'])}" for s, e in compose_env["veil-relay"]]
                      + [f"{s}:{port_of(e['VEIL_CONTROLLER_OPS_ADDR'])}" for s, e in compose_env["veil-controller"]])
if compose_targets != want_targets:
    fail(f"deploy/docker/prometheus.yml targets {compose_targets}, compose runs {want_targets}")


def promtool_config(path: Path, what: str) -> None:
    r = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail(f"promtool check config {what}: {(r.stdout + r.stderr).strip()}")
    else:
        log(f"  promtool check config {what}: ok")


with tempfile.TemporaryDirectory(prefix="veil-promcfg-") as tmp:
    tmp = Path(tmp)
    shutil.copy(PROM / "alerts.yml", tmp / "alerts.yml")
    # Compose mounts its config and alerts.yml side by side; check it the same way.
    shutil.copy(DOCKER / "prometheus.yml", tmp / "compose.yml")
    promtool_config(tmp / "compose.yml", "deploy/docker/prometheus.yml")
    # Try the Kubernetes config as it is; Debian's Prometheus is built without Kubernetes
    # discovery and rejects kubernetes_sd_configs, in which case check everything else with
    # that block swapped for a static target (the block itself is checked above).
    shutil.copy(PROM / "prometheus.yml", tmp / "k8s.yml")
    r = subprocess.run(["promtool", "check", "config", str(tmp / "k8s.yml")], capture_output=True,
                       text=True, timeout=60)
    if r.returncode == 0:
        log("  promtool check config deploy/prometheus/prometheus.yml: ok")
    elif "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        log("  NOTE: this promtool has no Kubernetes discovery (Debian builds it without); checking "
            "deploy/prometheus/prometheus.yml with kubernetes_sd_configs replaced by static_configs")
        swapped = yaml.safe_load((PROM / "prometheus.yml").read_text())
        for j in swapped["scrape_configs"]:
            del j["kubernetes_sd_configs"]
            j["static_configs"] = [{"targets": ["192.0.2.1:9190"]}]
        (tmp / "k8s-static.yml").write_text(yaml.safe_dump(swapped))
        promtool_config(tmp / "k8s-static.yml", "deploy/prometheus/prometheus.yml (static stand-in)")
    else:
        fail(f"promtool check config deploy/prometheus/prometheus.yml: {(r.stdout + r.stderr).strip()}")

# --- credentials: no shipped controller serves a role open ------------------------------------------

ROLE_VARS = {"signaling": "VEIL_CONTROLLER_SIGNALING_TOKENS", "relay": "VEIL_CONTROLLER_RELAY_TOKENS",
             "admin": "VEIL_CONTROLLER_ADMIN_TOKENS"}
for where, env in [("Kubernetes", env_k8s["veil-controller"])] + [
        (f"compose {s_}", e) for s_, e in compose_env["veil-controller"]]:
    allowed = set((env.get("VEIL_CONTROLLER_ALLOW_OPEN_ROLES") or "").split(","))
    for role, var in ROLE_VARS.items():
        if var not in env and role not in allowed:
            fail(f"{where} veil-controller: {var} is not set, so {role} would be open (it binds "
                 f"a reachable address, where the controller refuses that)")
    # Replicas share their sessions: every shipped controller names its peers and their
    # credential (ReplicaService is refused without one on a reachable address).
    for var in ("VEIL_CONTROLLER_PEERS", "VEIL_CONTROLLER_PEER_TOKENS"):
        if var not in env:
            fail(f"{where} veil-controller: {var} is not set, so its replicas would not share "
                 f"their sessions")
    peers = env.get("VEIL_CONTROLLER_PEERS", "")
    if where == "Kubernetes" and peers != env_k8s["veil-relay"].get("VEIL_RELAY_CONTROLLERS"):
        fail(f"Kubernetes veil-controller: VEIL_CONTROLLER_PEERS {peers!r} should name the headless "
             f"Service every replica is under, as the relays' VEIL_RELAY_CONTROLLERS does")
log("  every role of every shipped controller has its tokens, and every controller its peers")

# --- NetworkPolicy ----------------------------------------------------------------------------------

ctl_ports = {p["name"]: p["containerPort"] for p in container(sts, "veil-controller")["ports"]}
readme = (DEPLOY / "README.md").read_text()
policies = find("NetworkPolicy")
if not policies:
    fail("no NetworkPolicy for the controllers")
for np in policies:
    name = np["metadata"]["name"]
    sel = np["spec"]["podSelector"].get("matchLabels", {})
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        fail(f"NetworkPolicy {name} selects no controller pod: {sel}")
    if np["spec"].get("policyTypes") != ["Ingress"]:
        fail(f"NetworkPolicy {name}: policyTypes should be [Ingress] (egress is not restricted)")
    admitted: dict[str, list[dict]] = {}
    for rule in np["spec"].get("ingress", []):
        for port in rule.get("ports", []):
            if port["port"] not in ctl_ports and port["port"] not in ctl_ports.values():
                fail(f"NetworkPolicy {name}: port {port['port']} is no port of the controller")
            admitted.setdefault(str(port["port"]), []).extend(rule.get("from", []))
    grpc_from = admitted.get("grpc", [])
    ns_labels = [f["namespaceSelector"]["matchLabels"] for f in grpc_from if "namespaceSelector" in f]
    if not ns_labels:
        fail(f"NetworkPolicy {name}: gRPC is admitted from no signaling namespace")
    for labels in ns_labels:
        for k, v in labels.items():
            if f"{k}={v}" not in readme:
                fail(f"NetworkPolicy {name}: the namespace label {k}={v} is not documented in deploy/README.md")
    if not any("ipBlock" in f for f in grpc_from):
        fail(f"NetworkPolicy {name}: gRPC is not admitted from the relays' nodes (host network: an ipBlock)")
    if not any("namespaceSelector" in f for f in admitted.get("ops", [])):
        fail(f"NetworkPolicy {name}: the ops port is admitted from no monitoring namespace")
    if set(admitted) - {"grpc", "ops"}:
        fail(f"NetworkPolicy {name} admits ports {sorted(admitted)}")
log(f"  NetworkPolicy: gRPC from signaling namespaces and relay nodes, ops from monitoring")

# --- runbooks: every alert names a section of docs/OPERATIONS.md ---------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s_ = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s_.replace(" ", "-")


operations = (DEPLOY.parent / "docs" / "OPERATIONS.md").read_text()
anchors = {slug(m) for m in re.findall(r"^#+ (.+)$", operations, re.M)}
alerts = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
          if "alert" in r]
for r in alerts:
    url = r.get("annotations", {}).get("runbook_url", "")
    m = re.fullmatch(r"docs/OPERATIONS\.md#([a-z0-9-]+)", url)
    if not m:
        fail(f"alert {r['alert']}: runbook_url {url!r} is not docs/OPERATIONS.md#SECTION")
    elif m.group(1) not in anchors:
        fail(f"alert {r['alert']}: runbook_url {url}: docs/OPERATIONS.md has no such section")
log(f"  all {len(alerts)} alerts have a runbook section in docs/OPERATIONS.md")

# --- examples: relay pool ---------------------------------------------------------------------------

pools = [d for d in find("DaemonSet") if d is not ds]
for pool in pools:
    pname = pool["metadata"]["name"]
    pool_label = pool["spec"]["selector"]["matchLabels"].get("veil-relay-pool")
    if not pool_label:
        fail(f"DaemonSet {pname}: its selector has no veil-relay-pool label")
    tlabels = pool["spec"]["template"]["metadata"]["labels"]
    if any(tlabels.get(k) != v for k, v in pool["spec"]["selector"]["matchLabels"].items()):
        fail(f"DaemonSet {pname}: its selector does not match its own pods")
    if pool["spec"]["template"]["spec"]["nodeSelector"] != {"veil-relay-pool": pool_label}:
        fail(f"DaemonSet {pname}: nodeSelector should select the pool's nodes, veil-relay-pool={pool_label}")
    # Apart from what makes it a pool, it must be the shipped relay.
    a, b = json.loads(json.dumps(ds)), json.loads(json.dumps(pool))
    for d in (a, b):
        d["metadata"]["name"] = "x"
        d["metadata"]["labels"].pop("veil-relay-pool", None)
        d["spec"]["selector"]["matchLabels"].pop("veil-relay-pool", None)
        d["spec"]["template"]["metadata"]["labels"].pop("veil-relay-pool", None)
        t = d["spec"]["template"]["spec"]
        t.pop("nodeSelector")
        t.pop("initContainers", None)
        t["serviceAccountName"] = "x"
        t["volumes"] = [v for v in t["volumes"] if v["name"] in ("keys", "quic")]
        c = t["containers"][0]
        c["envFrom"] = []
        c["env"] = [e for e in c["env"] if e["name"] not in (
            "VEIL_RELAY_PUBLIC_UDP_ADDR", "VEIL_RELAY_PUBLIC_QUIC_ADDR",
            "VEIL_RELAY_PUBLIC_TURN_TCP_ADDR")]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] in ("keys", "quic")]
    if a != b:
        diff = [k for k in set(a["spec"]["template"]["spec"]) | set(b["spec"]["template"]["spec"])
                if a["spec"]["template"]["spec"].get(k) != b["spec"]["template"]["spec"].get(k)]
        fail(f"DaemonSet {pname} differs from 40-relay.yaml beyond what a pool changes "
             f"(pod spec fields {sorted(diff)}, or metadata/selector/strategy)")
    (cm_ref,) = [x["configMapRef"]["name"] for x in container(pool, "veil-relay")["envFrom"]]
    pool_cm = one("ConfigMap", cm_ref)["data"]
    base_cm = one("ConfigMap", "veil-relay")["data"]
    pool_keys = {"VEIL_RELAY_REGION", "VEIL_RELAY_ZONE", "VEIL_RELAY_PUBLIC_IP_FILE"}
    for k in sorted(set(pool_cm) | set(base_cm)):
        if k not in pool_keys and pool_cm.get(k) != base_cm.get(k):
            fail(f"ConfigMap {cm_ref}: {k}={pool_cm.get(k)!r}, 20-config.yaml has {base_cm.get(k)!r}")
    documented = documented_env("veil-relay")
    pool_env = set(pool_cm) | {e["name"] for e in container(pool, "veil-relay")["env"]}
    for n in sorted(v for v in pool_env if v.startswith("VEIL_") and v not in documented):
        fail(f"DaemonSet {pname}: {n} is not a variable `veil-relay --help` documents")
    # The public IP file: written by the init container into a volume the relay mounts.
    ip_file = pool_cm.get("VEIL_RELAY_PUBLIC_IP_FILE")
    if ip_file:
        d_ = ip_file.rpartition("/")[0]
        inits = pool["spec"]["template"]["spec"].get("initContainers", [])
        relay_mounts = {m["mountPath"]: m["name"] for m in container(pool, "veil-relay")["volumeMounts"]}
        writer = [i for i in inits if ip_file in " ".join(i.get("args", []) + i.get("command", []))
                  and any(m["mountPath"] == d_ and m["name"] == relay_mounts.get(d_) for m in i["volumeMounts"])]
        if not writer:
            fail(f"DaemonSet {pname}: no init container writes {ip_file} into a volume the relay mounts")
    log(f"  examples: relay pool {pname} is 40-relay.yaml but for its pool, its nodes and its public address")

# --- examples: prometheus-operator objects (custom resources: not validated by check.sh step c) ----

operator_docs = [d for f in sorted(OPERATOR.glob("*.yaml")) for d in load_all(f)]
monitors = [d for d in operator_docs if d["kind"] == "PodMonitor"]
for d in operator_docs:
    if d["apiVersion"] != "monitoring.coreos.com/v1" or d["kind"] not in ("PodMonitor", "PrometheusRule"):
        fail(f"examples/prometheus-operator: unexpected {d['apiVersion']} {d['kind']}")
    if d["metadata"].get("namespace") != NAMESPACE:
        fail(f"examples/prometheus-operator: {d['kind']} {d['metadata']['name']} is not in {NAMESPACE}")
by_job = {}
for pm in monitors:
    sel = pm["spec"]["selector"]["matchLabels"]
    matched = [b for b, w in workloads.items()
               if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    if len(matched) != 1:
        fail(f"PodMonitor {pm['metadata']['name']} selects {matched}, not one workload")
        continue
    w = workloads[matched[0]]
    job = w["spec"]["template"]["metadata"]["labels"].get(pm["spec"].get("jobLabel", ""))
    by_job[job] = pm
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    ops_port = [p for p in container(w, matched[0])["ports"] if p["name"] == ep["port"]]
    ann = w["spec"]["template"]["metadata"]["annotations"]
    if not ops_port or str(ops_port[0]["containerPort"]) != ann["prometheus.io/port"] or ep.get("path") != "/metrics":
        fail(f"PodMonitor {pm['metadata']['name']}: endpoint {ep} is not the ops port's /metrics")
    drops = [r for r in ep.get("relabelings", []) if r.get("action") == "drop"]
    want_drop = [r for r in jobs[matched[0]]["relabel_configs"] if r.get("action") == "drop"]
    if [(r["sourceLabels"], r["regex"]) for r in drops] != [(r["source_labels"], r["regex"]) for r in want_drop]:
        fail(f"PodMonitor {pm['metadata']['name']}: drops {drops}, prometheus.yml drops {want_drop}")
if set(by_job) != set(jobs):
    fail(f"the PodMonitors give jobs {sorted(by_job)}; prometheus.yml has {sorted(jobs)}")
if not RULE_FILE.exists() or RULE_FILE.read_text() != prometheus_rule_text():
    fail(f"{RULE_FILE.relative_to(DEPLOY.parent)} is not alerts.yml as a PrometheusRule: regenerate it with "
         f"`.venv/bin/python deploy/tests/check_config.py --write-prometheus-rule`")
log(f"  examples/prometheus-operator: {len(monitors)} PodMonitors with the jobs of prometheus.yml; "
    f"the PrometheusRule is alerts.yml")

# --- Dockerfile: release images carry stripped binaries -----------------------------------------

if "CARGO_PROFILE_RELEASE_STRIP=symbols" not in dockerfile or ".symtab" not in dockerfile:
    fail("Dockerfile: the image build must strip the binaries (CARGO_PROFILE_RELEASE_STRIP=symbols) and "
         "check that no symbol table is left")
if "VEIL_COMMIT" not in dockerfile:
    fail("Dockerfile: VEIL_COMMIT (veil_build_info's commit label) is not passed to the build")

# --- Grafana --------------------------------------------------------------------------------------

provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "veil.yaml").read_text())
dash_path = provider["providers"][0]["options"]["path"]
grafana_svc = compose["services"].get("grafana", {})
mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana_svc.get("volumes", [])}
if mounts.get(dash_path) != "../grafana/dashboards":
    fail(f"compose does not mount deploy/grafana/dashboards at the provider path {dash_path}")
ds_prov = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "veil.yaml").read_text())
if [d["type"] for d in ds_prov["datasources"]] != ["prometheus"]:
    fail("the provisioned data source should be one Prometheus")
for path in sorted((GRAFANA / "dashboards").glob("*.json")):
    dash = json.loads(path.read_text())
    name = path.name
    if not dash.get("uid") or dash.get("id") is not None:
        fail(f"{name}: a provisioned dashboard needs a uid and no id")
    variables = {v["name"] for v in dash["templating"]["list"]}
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels += p.get("panels", [])
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        fail(f"{name}: duplicate panel ids")
    cells = set()
    for p in panels:
        g = p["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            fail(f"{name}: panel {p['title']!r} is outside the 24-column grid")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    fail(f"{name}: panel {p['title']!r} overlaps another at ({x}, {y})")
                cells.add((x, y))
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{name}: panel {p['title']!r} does not use the $datasource variable")
        refs = [t["refId"] for t in p.get("targets", [])]
        if not refs or len(refs) != len(set(refs)):
            fail(f"{name}: panel {p['title']!r} has no targets or duplicate refIds")
        for t in p.get("targets", []):
            for v in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", t["expr"]):
                if v not in variables and not v.startswith("__"):
                    fail(f"{name}: panel {p['title']!r} uses undefined variable ${v}")
    log(f"  {name}: {len(panels)} panels, well-formed, provisioned at {dash_path}")

if errors:
    for e in errors:
        print(f"FAIL {e}", file=sys.stderr)
    sys.exit(1)
log("  deploy configuration is consistent")
