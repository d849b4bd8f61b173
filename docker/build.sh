#!/usr/bin/env bash
# Builds a CPU stand-in image (make image, make image-2025).
# Usage: docker/build.sh [TAG] [REQUIREMENTS]
#   default: spark-nvfp4/trtllm-standin:cpu from docker/requirements-standin.txt (the new stack)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag=${1:-spark-nvfp4/trtllm-standin:cpu}
reqs=${2:-$here/requirements-standin.txt}
# Up to date: an image built from this very Dockerfile and requirements (and base) is kept. A
# rebuild would re-run the pip stage, whose cache the prune below removes (minutes on 2 cores).
"$here/build-base.sh"
base_id=$(docker image inspect -f '{{.Id}}' spark-nvfp4/debian-base:bookworm)
build_hash=$(cat "$here/Dockerfile.standin" "$reqs" <(echo "$base_id") | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "io.spark-nvfp4.build-hash"}}' "$tag" 2>/dev/null)" \
     = "$build_hash" ]; then
  echo "$tag is up to date (build $build_hash)"; exit 0
fi
ctx=$(mktemp -d /var/tmp/spark-nvfp4-ctx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile.standin" "$ctx/"
cp "$reqs" "$ctx/requirements-standin.txt"
# The host's CA bundle, so pip inside the build trusts what the host trusts.
cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/ca-bundle.crt"
# The CPU torch wheel: take it from wherever this host's pip finds it
# (a local wheel directory here; PyPI's CPU index elsewhere).
mkdir -p "$ctx/wheels"
python3 -m pip download --no-deps --only-binary=:all: -q -d "$ctx/wheels" \
  "$(grep '^torch==' "$reqs")" \
  || echo "no local torch wheel; the build will fetch it"
# --force-rm + the prune: the build stage (CA bundle, wheels) leaves no image behind.
docker build --force-rm --label "io.spark-nvfp4.stack=$(basename "$reqs" .txt)" \
  --label "io.spark-nvfp4.build-hash=$build_hash" \
  -f "$ctx/Dockerfile.standin" -t "$tag" "$ctx"
docker image prune -f --filter "label=io.spark-nvfp4.build-stage=true" >/dev/null
echo "built $tag"
