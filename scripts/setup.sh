#!/usr/bin/env bash
# Installs everything tracer needs on a fresh Debian 12 machine of this kind, idempotently.
# Pins follow shared/TOOLCHAIN.md: Debian rustc-web 1.96 + prebuilt BPF core, bpf-linker 0.13 on LLVM 22.
set -euo pipefail

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(
  rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  iproute2 iptables ipset conntrack tcpdump iputils-ping curl bird etcd-server etcd-client iperf3 wrk ethtool bpftool
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
  log "Debian packages present"
fi

# Daemons from packages must not run in the root namespace: the lab starts its own copies.
for svc in bird bird6 etcd; do
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
done
pkill -x bird 2>/dev/null || true
pkill -x etcd 2>/dev/null || true

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (a few minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
    --no-default-features --features llvm-22
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

mountpoint -q /sys/fs/bpf || { log "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }
if [ ! -d /sys/kernel/tracing/events ]; then
  log "mounting tracefs"
  mount -t tracefs tracefs /sys/kernel/tracing
fi
log "setup complete"
