#!/usr/bin/env bash
# Validates everything under deploy/ (run by scripts/test.sh; also runs on its own from any
# directory). Nothing is skipped for a missing tool: a missing tool is installed, or the run fails.
#
#   a. a Python virtual environment at .venv with yamllint and kubernetes-validate (pinned in
#      deploy/requirements.txt), installed only when missing or changed;
#   b. yamllint over all deploy YAML (deploy/.yamllint);
#   c. kubernetes-validate --strict over the manifests, against the oldest Kubernetes these
#      manifests support and the newest the validator knows;
#   d. promtool (Debian's prometheus package, installed when missing): check rules, unit tests
#      of the alerts, check config of both Prometheus configurations; then cross-file
#      consistency of the manifests, compose, Dockerfile, scrape configs and dashboard;
#   e. every metric name the dashboard and the alerts use is exported by a live dev cluster,
#      whose scrapes pass `promtool check metrics`;
#   f. a real Prometheus scraping a dev cluster under a 15 s call load sees the forwarded
#      packet rate the load test sent (+-15%), evaluates every alert rule and dashboard query;
#   g. the shipped deployments run as shipped: every container of the manifests and every
#      service of compose.yml gets the environment, Secret files, user and names its file gives
#      it, in its own network namespace; `--check-config` passes with it, the probes pass, and
#      calls flow through each cluster (deploy/tests/cluster_netns.py; needs root);
#   h. chaos on separate hosts: over a link with 1% loss and jitter, no flapping, and relays
#      SIGKILLed and cut off; a rolling restart of every relay; the controller killed, the
#      relays cut off from it; under a 20-call load with hot standby, each with its figures
#      asserted (deploy/tests/chaos_netns.py; needs root; docs/RELIABILITY.md);
#   i. a 5-minute soak of a local cluster at a steady load with churn and hot standby: flat
#      resident memory and descriptors over its second half, no call failed, no datagram
#      failing authentication (veil-loadtest --soak);
#   j. the kernel fast path on separate hosts: veil-relay built with `xdp`, real calls
#      forwarded by its XDP program, captured on a participant's host (the relay's own header
#      fields, checksums), legs gone within 1 s of release, the ticket's rate limits
#      (deploy/tests/xdp_netns.py; needs root; docs/PERFORMANCE.md).
#
# The workspace binaries (target/debug/veil-*) come from `cargo build --workspace --all-targets`,
# which scripts/test.sh runs first; this script runs the same build, a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_MIN=1.30.0 # lifecycle.preStop.sleep (30-controller.yaml) is on by default from 1.30
KUBERNETES_NEW=1.37.0 # the newest schema kubernetes-validate 1.37.0 ships
VENV=.venv
start=$SECONDS
passed=0 # checks that passed; any failure stops the script (set -e)

step() { printf -- '-- %s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

step "a. Python tools in $VENV"
if [[ ! -x $VENV/bin/python ]]; then
  command -v python3 >/dev/null || die "python3 is not installed"
  if ! python3 -m venv "$VENV"; then
    [[ $(id -u) -eq 0 ]] || die "python3 cannot create a virtual environment; install python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
fi
stamp=$VENV/.veil-deploy-requirements.txt
if ! cmp -s deploy/requirements.txt "$stamp"; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r deploy/requirements.txt
  cp deploy/requirements.txt "$stamp"
fi
"$VENV/bin/yamllint" --version
echo "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"

# check_config.py reads the binaries' --help; steps e and f run them.
step "workspace binaries (cargo build, a no-op after scripts/test.sh's build)"
cargo build --workspace --all-targets --locked --quiet

step "b. yamllint"
"$VENV/bin/yamllint" --strict -c deploy/.yamllint deploy
passed=$((passed + 1))
echo "ok: $(find deploy -name '*.yml' -o -name '*.yaml' | wc -l) files"

step "c. kubernetes-validate --strict ($KUBERNETES_MIN and $KUBERNETES_NEW)"
manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml)
for version in "$KUBERNETES_MIN" "$KUBERNETES_NEW"; do
  # It only warns, with exit status 0, about a kind it has no schema for: treat that as failure.
  out=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" 2>&1) ||
    die "kubernetes-validate $version:"$'\n'"$out"
  [[ -z $out ]] || die "kubernetes-validate $version:"$'\n'"$out"
  echo "ok: ${#manifests[@]} files against Kubernetes $version"
  passed=$((passed + 1))
done

step "d. promtool"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  [[ $(id -u) -eq 0 ]] ||
    die "promtool and prometheus are missing; run this script as root to install Debian's prometheus package, or install it yourself"
  echo "installing Debian's prometheus package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version | head -n1
promtool check rules deploy/prometheus/alerts.yml
passed=$((passed + 1))
promtool test rules deploy/prometheus/alerts_test.yml
passed=$((passed + 1))
step "d. configuration consistency (and promtool check config)"
"$VENV/bin/python" deploy/tests/check_config.py
passed=$((passed + 1))

step "e. metric names used by the dashboard and the alerts"
python3 deploy/tests/check_metric_names.py
passed=$((passed + 1))

step "f. a real Prometheus scraping a dev cluster under load"
python3 deploy/tests/prometheus_e2e.py
passed=$((passed + 1))

step "g. the shipped Kubernetes and compose clusters, as processes in network namespaces"
[[ $(id -u) -eq 0 ]] || die "step g creates network namespaces: run this script as root"
"$VENV/bin/python" deploy/tests/cluster_netns.py
passed=$((passed + 1))

step "h. chaos: relays, links and the controller lost under load, in network namespaces"
"$VENV/bin/python" deploy/tests/chaos_netns.py
passed=$((passed + 1))

step "i. a 5-minute soak (veil-loadtest --soak --local): memory and descriptors stay flat"
target/debug/veil-loadtest --local --local-relays 2 --soak --duration 5m --soak-round 30s \
  --calls 10 --participants 3 --churn 1 --churn-dwell 5s --failover hot --quiet
passed=$((passed + 1))

step "j. the XDP fast path: real calls through the program, in network namespaces"
[[ $(id -u) -eq 0 ]] || die "step j loads XDP programs in network namespaces: run this script as root"
"$VENV/bin/python" deploy/tests/xdp_netns.py
passed=$((passed + 1))

echo "deploy checks passed in $((SECONDS - start)) s"
echo "deploy: $passed passed, 0 failed"
