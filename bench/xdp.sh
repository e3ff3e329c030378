#!/usr/bin/env bash
# The kernel fast path against userspace, in one run, on a veth pair between two network
# namespaces that this script creates and removes: veil-relay with its XDP program, veil-relay
# without it, and the bare userspace forwarder (veil-floor), relay-side CPU per packet read from
# the forwarder's process and the relay device's threaded NAPI poller (../shared/XDP-NOTES.md).
#
#   sudo bench/xdp.sh                      # 200 and 1200 bytes at 50k and 100k datagrams/s
#   sudo bench/xdp.sh --rates 50000 --sizes 200
#
# Needs root, two CPUs, clang, bpftool and ethtool. Figures: docs/PERFORMANCE.md. Every load is
# bounded (a 0.7 s warm-up and a 3 s window per step); everything it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "error: bench/xdp.sh creates network namespaces: run it as root" >&2; exit 1; }
for t in clang bpftool ethtool taskset nsenter; do
  command -v "$t" >/dev/null || { echo "error: $t is missing" >&2; exit 1; }
done

cargo build --release -q -p veil-relay --features xdp --bin veil-relay
cargo build --release -q -p veil-bench --bin xdp-bench --bin veil-floor

id=$$
gen="veil-xb$id-gen" relay="veil-xb$id-relay"
gdev="vxg$id" rdev="vxr$id"
work=$(mktemp -d /tmp/veil-xdp-bench.XXXXXX)
pins="/sys/fs/bpf/veil-xdp-bench-$id"
cleanup() {
  ip netns del "$gen" 2>/dev/null || true
  ip netns del "$relay" 2>/dev/null || true
  rm -rf "$pins" "$work"
}
trap cleanup EXIT

ip netns add "$gen"
ip netns add "$relay"
ip -n "$gen" link set lo up
ip -n "$relay" link set lo up
ip -n "$gen" link add "$gdev" type veth peer name "$rdev" netns "$relay"
ip -n "$gen" addr add 10.233.0.2/24 dev "$gdev"
ip -n "$gen" addr add 10.233.0.3/24 dev "$gdev"
ip -n "$relay" addr add 10.233.0.1/24 dev "$rdev"
# Checksums complete on the wire (a veth with tx offload hands over partial ones); no TSO on the
# relay's side, so that the receiver's stack work is not charged to the forwarder; GRO on the
# relay's device, so that it receives in a NAPI poller in every configuration, threaded and
# pinned to the relay's CPU, where its run time can be read.
ip netns exec "$gen" ethtool -K "$gdev" tx off >/dev/null
ip netns exec "$relay" ethtool -K "$rdev" tx off tso off gro on >/dev/null
ip -n "$gen" link set "$gdev" up
ip -n "$relay" link set "$rdev" up
# The generator's device takes the frames the relay's XDP program sends back (XDP_TX) only with
# an XDP program of its own: the object's pass-through program, attached in every configuration.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
clang -O2 -g -target bpf "-I/usr/include/$(cc -dumpmachine)" -c relay/xdp/veil.bpf.c -o "$work/veil.bpf.o"
bpftool prog loadall "$work/veil.bpf.o" "$pins"
nsenter --net="/run/netns/$gen" bpftool net attach xdp pinned "$pins/veil_pass" dev "$gdev"
ip netns exec "$relay" sh -c "echo 1 > /sys/class/net/$rdev/threaded"
ip netns exec "$gen" sh -c "echo 1 > /sys/class/net/$gdev/threaded"
sleep 0.5
napi_of() {
  for p in /proc/[0-9]*; do
    case "$(cat "$p/comm" 2>/dev/null)" in "napi/$1-"*) basename "$p"; return ;; esac
  done
}
rnapi=$(napi_of "$rdev") gnapi=$(napi_of "$gdev")
[[ -n $rnapi && -n $gnapi ]] || { echo "error: no threaded NAPI poller for $rdev or $gdev" >&2; exit 1; }
taskset -pc 0 "$rnapi" >/dev/null
taskset -pc 1 "$gnapi" >/dev/null
echo "veth $gdev (generator, CPU 1) <-> $rdev (relay, CPU 0); relay NAPI thread $rnapi, generator's $gnapi"
echo "kernel $(uname -r), $(nproc) CPUs"
out="target/bench/xdp-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
ip netns exec "$gen" taskset -c 1 target/release/xdp-bench --relay-ns "$relay" --relay-dev "$rdev" \
  --relay-ip 10.233.0.1 --send-ip 10.233.0.2 --recv-ip 10.233.0.3 --napi-tid "$rnapi" \
  --bin-dir target/release --json "$out/xdp.json" "$@" | tee "$out/xdp.txt"
