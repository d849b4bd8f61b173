#!/usr/bin/env bash
# Builds the CPU stand-in image (make image). Usage: docker/build.sh [TAG]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag=${1:-spark-nvfp4/trtllm-standin:cpu}
"$here/build-base.sh"
ctx=$(mktemp -d /var/tmp/spark-nvfp4-ctx.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$here/Dockerfile.standin" "$here/requirements-standin.txt" "$ctx/"
# The host's CA bundle, so pip inside the build trusts what the host trusts.
cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/ca-bundle.crt"
# The CPU torch wheel: take it from wherever this host's pip finds it
# (a local wheel directory here; PyPI's CPU index elsewhere).
mkdir -p "$ctx/wheels"
python3 -m pip download --no-deps --only-binary=:all: -q -d "$ctx/wheels" \
  "$(grep '^torch==' "$here/requirements-standin.txt")" \
  || echo "no local torch wheel; the build will fetch it"
docker build -f "$ctx/Dockerfile.standin" -t "$tag" "$ctx"
echo "built $tag"
