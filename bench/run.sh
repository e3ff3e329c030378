#!/usr/bin/env bash
# Veil's benchmarks in one command: forwarding side by side (veil-relay over UDP and QUIC, coturn,
# a bare recvmmsg/sendmmsg forwarder, and the loopback itself), the video-burst case, memory per
# bound leg, and the controller's AllocateSession throughput and latency. See bench/README.md.
#
#   bench/run.sh            # the full run (about 6 minutes on a quiet machine)
#   bench/run.sh --quick    # shorter windows, no refinement (about 3 minutes)
#   bench/run.sh --only forward,video     # some sections: forward, video, memory, controller
#
# Forwarders are pinned to CPU 0 and the generator to CPU 1 (taskset). Everything runs on
# loopback; every process started is stopped by its PID. Results: target/bench/<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
only="forward,video,memory,controller"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (--quick, --only SECTIONS)" >&2; exit 64 ;;
  esac
  shift
done
want() { [[ ",$only," == *",$1,"* ]]; }

if [ "$(nproc --all)" -lt 2 ]; then
  echo "run.sh: needs two CPUs (one for the forwarder, one for the generator)" >&2
  exit 1
fi
for tool in taskset; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing" >&2; exit 1; }
done

# coturn, the TURN yardstick: Debian's package, installed when missing and running as root.
configs="direct,floor,veil-udp,veil-quic,coturn,veil-turn,coturn-turn"
video_configs="direct,floor,veil-udp,coturn"
if [ ! -x /usr/bin/turnserver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing coturn (apt-get install -y coturn)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null; }
  fi
fi
if [ ! -x /usr/bin/turnserver ]; then
  echo "warning: coturn is not installed and cannot be installed here: measuring without it" >&2
  configs="direct,floor,veil-udp,veil-quic,veil-turn"
  video_configs="direct,floor,veil-udp"
fi

echo "== build (release)"
cargo build --release --locked -p veil-relay -p veil-controller -p veil-bench

out="target/bench/$(date +%Y%m%d-%H%M%S)${quick:+-quick}"
mkdir -p "$out"
bin=target/release
echo "== results go to $out"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/load.txt"

if want forward; then
  echo "== forwarding"
  taskset -c 1 "$bin/veil-bench" forward $quick --configs "$configs" --json "$out/forward.json" \
    | tee "$out/forward.txt"
fi
if want video; then
  echo "== video bursts"
  taskset -c 1 "$bin/veil-bench" video $quick --configs "$video_configs" --json "$out/video.json" \
    | tee "$out/video.txt"
fi
if want memory; then
  echo "== memory per bound leg"
  taskset -c 1 "$bin/legs-memory" --json "$out/memory.json" | tee "$out/memory.txt"
fi
if want controller; then
  echo "== controller"
  taskset -c 1 "$bin/veil-bench" controller $quick --json "$out/controller.json" \
    | tee "$out/controller.txt"
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load.txt"
echo "== done: $out"
