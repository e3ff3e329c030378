#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need beyond cargo, idempotently,
# then builds everything and runs every test. Nothing is skipped for a missing tool: a missing
# tool is installed, or the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain"
cargo --version
rustc --version

echo "== system packages (Debian)"
# Chromium renders the load test's HTML report in a test, and makes WebRTC calls through Veil's
# TURN driven by chromedriver; Prometheus (and promtool) serve the
# deploy checks. Installed when missing, as root; otherwise the run stops here, naming them.
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
{ command -v promtool && command -v prometheus; } >/dev/null || need+=(prometheus)
# deploy/tests/cluster_netns.py runs the shipped deployment in network namespaces.
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
# coturn's turnutils_uclient runs 100 TURN clients through Veil (controller/tests/turn_uclient.rs).
# Only the client is wanted: Debian enables and starts the package's turnserver under systemd
# (/etc/default/coturn gates only the sysvinit script), so it is stopped and disabled below.
command -v turnutils_uclient >/dev/null || need+=(coturn)
# The kernel fast path (veil-relay's `xdp` feature): clang builds relay/xdp/veil.bpf.c against
# libbpf's headers; bpftool and ethtool set up its test bed (deploy/tests/xdp_netns.py).
command -v clang >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v bpftool >/dev/null || need+=(bpftool)
command -v ethtool >/dev/null || need+=(ethtool)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${need[*]} (run as root, or install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  if [[ " ${need[*]} " == *" coturn "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now --quiet coturn.service
  fi
fi

echo "== python test environment (.venv)"
# Idempotent: creates the virtual environment once, then only installs what is missing.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt

echo "== format"
cargo fmt --all -- --check

echo "== build (all targets)"
cargo build --workspace --all-targets --locked

echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p veil-relay --features xdp --all-targets --locked -- -D warnings

echo "== tests"
cargo test --workspace --locked -- --test-threads=2
# The XDP program in the kernel (BPF_PROG_TEST_RUN; root: under CI=true a skip is a failure).
cargo test -p veil-relay --features xdp --locked --test xdp_program

echo "== deploy checks"
./deploy/check.sh

echo "== fuzz (bounded)"
FUZZ_SECONDS=${FUZZ_SECONDS:-10} ./scripts/fuzz.sh
