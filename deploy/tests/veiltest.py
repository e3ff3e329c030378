"""Helpers for deploy/tests: start and stop processes by PID, the local dev cluster, HTTP GETs.

Standard library only. Every wait is bounded; every process started here is stopped here, by
its PID, in a `finally` (or a context manager's exit), whatever happens in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"


def binary(name: str) -> Path:
    """A workspace binary from the debug build; fails clearly if it was not built."""
    path = TARGET / name
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: run `cargo build --workspace` first")
    return path


def log(msg: str) -> None:
    print(msg, flush=True)


def stop(proc: subprocess.Popen, name: str, grace: float = 10.0) -> None:
    """Stops a process this script started: SIGTERM to its PID, then SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) ignored SIGTERM for {grace:.0f}s; killing it")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET `url`: (status, body); a connection failure is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


class DevCluster:
    """`veil-controller --dev --dev-relays N` on loopback: started on enter, stopped on exit.

    Attributes once started: `ready` (the READY line's JSON), `controller_url`,
    `controller_metrics` and `relay_metrics` (host:port strings).
    """

    def __init__(self, relays: int = 2, workdir: Path | None = None, timeout: float = 30.0):
        self.relays = relays
        self.timeout = timeout
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="veil-dev-"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "DevCluster":
        out_path = self.workdir / "dev.stdout"
        err_path = self.workdir / "dev.stderr"
        # Output goes to files, not pipes, so the process can never block on a full pipe.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [str(binary("veil-controller")), "--dev", "--dev-relays", str(self.relays)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, "VEIL_LOG": "warn"},
            )
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                text = out_path.read_text(errors="replace")
                line = next((l for l in text.splitlines() if l.startswith("READY ")), None)
                if line is not None:
                    self.ready = json.loads(line[len("READY "):])
                    break
                if self.proc.poll() is not None:
                    raise SystemExit(
                        f"error: dev cluster exited with {self.proc.returncode} before READY:\n"
                        + err_path.read_text(errors="replace")[-2000:]
                    )
                if time.monotonic() > deadline:
                    raise SystemExit(f"error: dev cluster printed no READY line in {self.timeout}s")
                time.sleep(0.1)
            self.controller_url = self.ready["controller"]
            self.controller_metrics = self.ready["controller_metrics"]
            self.relay_metrics = [r["metrics"] for r in self.ready["relays"]]
            if len(self.relay_metrics) != self.relays:
                raise SystemExit(f"error: READY lists {len(self.relay_metrics)} relays, not {self.relays}")
            log(f"dev cluster (pid {self.proc.pid}): controller {self.controller_url}, "
                f"ops {self.controller_metrics}, relays {', '.join(self.relay_metrics)}")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc, "dev cluster")
            code = self.proc.returncode
            self.proc = None
            # SIGTERM is the cluster's normal way to stop: anything but 0 is a failure.
            if code != 0 and exc[0] is None:
                raise SystemExit(f"error: dev cluster exited with status {code} on SIGTERM")
        if self._own_dir:
            with contextlib.suppress(OSError):
                for p in self.workdir.iterdir():
                    p.unlink()
                self.workdir.rmdir()
