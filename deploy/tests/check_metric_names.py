#!/usr/bin/env python3
"""Checks that the dashboard and the alert rules only name metrics Veil exports.

Starts `veil-controller --dev --dev-relays 2` (controller and relays on loopback), scrapes every
/metrics endpoint its READY line names, runs `promtool check metrics` on each scrape, and asserts
that every `veil_*` and `process_*` metric name referenced anywhere in
deploy/grafana/dashboards/*.json and deploy/prometheus/alerts.yml is a series name in the scrape
of a process that exports it: veil_relay_* on the relays, veil_controller_* on the controller,
process_* and veil_build_info on both. Histograms must be referenced as _bucket, _sum or
_count.

Standard library only. Exit status 0 when everything checks out, 1 otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from veiltest import DEPLOY, DevCluster, http_get, log  # noqa: E402

# A metric name as the dashboard and rules spell it: lower case, starting with a prefix Veil's
# binaries export. Upper-case VEIL_* environment variables and hyphenated job names never match.
REFERENCE = re.compile(r"(?<![A-Za-z0-9_:])((?:veil|process)_[a-z0-9_]+)")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def references(path: Path) -> set[str]:
    return set(REFERENCE.findall(path.read_text()))


def scrape(addr: str) -> str:
    status, body = http_get(f"http://{addr}/metrics")
    if status != 200:
        raise SystemExit(f"error: GET http://{addr}/metrics answered {status or 'nothing'}")
    return body.decode()


def parse(text: str) -> tuple[set[str], dict[str, str]]:
    """Series names in an exposition, and each family's TYPE."""
    names, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            types[family] = kind.strip()
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            if m:
                names.add(m.group(1))
    return names, types


def promtool_check(text: str, what: str) -> list[str]:
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        return [f"promtool check metrics on {what}: {(r.stdout + r.stderr).strip()}"]
    log(f"  promtool check metrics: {what}: ok")
    return []


def main() -> int:
    sources = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    sources.append(DEPLOY / "prometheus" / "alerts.yml")
    refs = {src: references(src) for src in sources}
    errors: list[str] = []

    with DevCluster(relays=2) as cluster:
        scrapes = {"controller": [scrape(cluster.controller_metrics)]}
        scrapes["relay"] = [scrape(addr) for addr in cluster.relay_metrics]
        for addr, text in zip([cluster.controller_metrics], scrapes["controller"]):
            errors += promtool_check(text, f"controller {addr}")
        for addr, text in zip(cluster.relay_metrics, scrapes["relay"]):
            errors += promtool_check(text, f"relay {addr}")

    exported: dict[str, set[str]] = {}
    types: dict[str, str] = {}
    for kind, texts in scrapes.items():
        for text in texts:
            names, t = parse(text)
            exported.setdefault(kind, set()).update(names)
            types.update(t)
        if not any(n.startswith("veil_") for n in exported[kind]):
            errors.append(f"the {kind} scrape holds no veil_* series at all")

    def where(name: str) -> list[str]:
        if name.startswith("veil_relay_"):
            return ["relay"]
        if name.startswith("veil_controller_"):
            return ["controller"]
        if name.startswith("process_") or name == "veil_build_info":
            return ["relay", "controller"]
        return []

    checked = 0
    for src, names in refs.items():
        rel = src.relative_to(DEPLOY.parent)
        if not names:
            errors.append(f"{rel}: references no veil_* metric at all (wrong file?)")
        for name in sorted(names):
            checked += 1
            if types.get(name) == "histogram":
                errors.append(f"{rel}: {name} is a histogram; reference {name}_bucket, _sum or _count")
                continue
            kinds = where(name)
            if not kinds:
                errors.append(f"{rel}: {name} is not a name any Veil binary could export")
                continue
            for kind in kinds:
                if name not in exported[kind]:
                    errors.append(f"{rel}: {name} is not exported by the {kind} "
                                  f"(not in its /metrics scrape)")
        log(f"  {rel}: {len(names)} metric names referenced")

    if errors:
        for e in errors:
            print(f"FAIL {e}", file=sys.stderr)
        return 1
    log(f"  all {checked} metric references are exported by the process that owns them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
