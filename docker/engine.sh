#!/usr/bin/env bash
# A private Docker engine for the container test on a machine without one running:
#   docker/engine.sh start DIR   installs docker.io and debootstrap if missing, starts dockerd
#                                on unix://DIR/docker.sock, imports localhost/debian:bookworm
#   docker/engine.sh stop DIR    stops that dockerd
set -euo pipefail
action=$1; dir=$(realpath -m "$2")
if [ "$action" = stop ]; then
  [ -f "$dir/dockerd.pid" ] && kill "$(cat "$dir/dockerd.pid")" 2>/dev/null || true
  exit 0
fi
mkdir -p "$dir"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
  -H "unix://$dir/docker.sock" --bridge=none --iptables=false --ip6tables=false \
  >"$dir/dockerd.log" 2>&1 &
export DOCKER_HOST="unix://$dir/docker.sock"
for _ in $(seq 60); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 1; done
/usr/bin/docker version >/dev/null
if ! /usr/bin/docker image inspect localhost/debian:bookworm >/dev/null 2>&1; then
  [ -d "$dir/rootfs/usr" ] || debootstrap --variant=minbase bookworm "$dir/rootfs" \
    http://deb.debian.org/debian >"$dir/debootstrap.log" 2>&1
  tar -C "$dir/rootfs" -c . | /usr/bin/docker import - localhost/debian:bookworm >/dev/null
fi
echo "$DOCKER_HOST"
