#!/usr/bin/env bash
# Builds tracer's container image FROM scratch with podman: the agent binary and exactly the
# files it runs, nothing else (no shell, no package manager). No public registry is reachable
# here, so there is no base image to pull: the root filesystem is assembled from this machine's
# Debian files and imported (`podman import`).
#
#   scripts/build-image.sh TRACER_BINARY IMAGE_TAG [MANIFEST_OUT]
#
# Prints the image's size; MANIFEST_OUT (optional) receives every file with why it is there.
# Used by `cargo xtask image` (release binary) and tests/image.rs (the binary under test).
set -euo pipefail

bin=${1:?usage: build-image.sh TRACER_BINARY IMAGE_TAG [MANIFEST_OUT]}
tag=${2:?usage: build-image.sh TRACER_BINARY IMAGE_TAG [MANIFEST_OUT]}
manifest_out=${3:-}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
manifest=$work/manifest
mkdir -p "$root"

# add SRC DEST WHY: one file, with the reason it is in the image.
add() {
  install -D -m "$(stat -c %a "$1")" "$1" "$root$2"
  printf '%s\t%s\n' "$2" "$3" >>"$manifest"
}
# Every shared library an ELF file loads, at its own path, once.
add_libs() {
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
    [ -e "$root$lib" ] && continue
    add "$(readlink -f "$lib")" "$lib" "shared library of $(basename "$1")"
  done
}

# The agent, without debug info (the image runs it, nobody debugs it there).
install -D -m 0755 "$bin" "$root/usr/local/bin/tracer"
strip --strip-debug "$root/usr/local/bin/tracer"
printf '%s\t%s\n' /usr/local/bin/tracer "the agent and CLI (ENTRYPOINT)" >>"$manifest"
add_libs "$bin"

# felix's iptables dataplane is read with its own tools: `ipset save` for the pool sets and
# `iptables-save -t nat` for the natOutgoing rule, in whichever backend felix programs (nft or
# legacy, so both multi-call binaries). The nftables dataplane is read over netlink and needs
# none of this.
add /usr/sbin/ipset /usr/sbin/ipset "reads felix's pool ipsets (iptables dataplane)"
add_libs /usr/sbin/ipset
for multi in xtables-nft-multi xtables-legacy-multi; do
  add "/usr/sbin/$multi" "/usr/sbin/$multi" "iptables-save for felix's natOutgoing rule ($multi backend)"
  add_libs "/usr/sbin/$multi"
done
for fam in iptables ip6tables; do
  ln -s xtables-nft-multi "$root/usr/sbin/$fam-save"
  ln -s xtables-nft-multi "$root/usr/sbin/$fam-nft-save"
  ln -s xtables-legacy-multi "$root/usr/sbin/$fam-legacy-save"
  printf '%s\t%s\n' "/usr/sbin/$fam-{,nft-,legacy-}save" "symlinks: the names the agent runs" >>"$manifest"
done
# iptables-save prints each rule through its match and target modules (set, comment,
# MASQUERADE, SNAT, ...): all of them, since felix's rules may use any.
for so in /usr/lib/x86_64-linux-gnu/xtables/*.so; do
  add "$so" "$so" "iptables-save module"
  add_libs "$so"
done

# Protocol names in iptables-save output (`-p tcp`), and name lookups (the headless Service
# for `tracer flows --all-nodes`; the kubelet mounts /etc/hosts and /etc/resolv.conf).
add /etc/protocols /etc/protocols "protocol names for iptables-save"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf '%s\t%s\n' /etc/nsswitch.conf "name lookups: files, then DNS" >>"$manifest"
# Mount points the runtime fills (the DaemonSet mounts tracefs and BTF read-only).
mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/etc/tracer" "$root/tmp"

tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .
podman import -q \
  --change 'ENTRYPOINT ["/usr/local/bin/tracer"]' \
  --change 'CMD ["agent"]' \
  --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin' \
  --change 'EXPOSE 9464' \
  --change 'LABEL org.opencontainers.image.title=tracer' \
  "$work/rootfs.tar" "$tag" >/dev/null

size=$(podman image inspect --format '{{.Size}}' "$tag")
files=$(wc -l <"$manifest")
echo "image $tag: $size bytes ($((size / 1024 / 1024)) MiB), $files entries"
if [ -n "$manifest_out" ]; then
  sort -u "$manifest" >"$manifest_out"
fi
