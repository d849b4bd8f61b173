#!/usr/bin/env bash
# Builds the Debian base of the CPU stand-in image: debootstrap a bookworm root
# with Python in it, then `docker import` it. No image registry is needed; the
# Debian mirror is the one this host's apt already uses.
set -euo pipefail
tag=${1:-spark-nvfp4/debian-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag present"; exit 0
fi
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
         || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
root=$(mktemp -d /var/tmp/spark-nvfp4-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates,procps \
  bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$tag"
echo "imported $tag"
