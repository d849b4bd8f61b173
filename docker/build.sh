#!/usr/bin/env bash
# Builds a CPU stand-in image (make image, make image-2025).
# Usage: docker/build.sh [TAG] [REQUIREMENTS]
#   default: spark-nvfp4/trtllm-standin:cpu from docker/requirements-standin.txt (the new stack)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag=${1:-spark-nvfp4/trtllm-standin:cpu}
reqs=${2:-$here/requirements-standin.txt}
"$here/build-base.sh"
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
  -f "$ctx/Dockerfile.standin" -t "$tag" "$ctx"
docker image prune -f --filter "label=io.spark-nvfp4.build-stage=true" >/dev/null
echo "built $tag"
