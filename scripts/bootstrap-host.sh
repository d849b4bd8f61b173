#!/usr/bin/env bash
# Installs and starts what the launcher and its tests need on a Debian host:
# Docker (Debian's docker.io) and its daemon, debootstrap for the stand-in image,
# docker-registry + docker-compose for the pull tests, npm for the builtin text,
# chromium for the report test, jq for the README's CI gate (test_reuse.py). Idempotent; installs only what is missing.
# On a DGX Spark, Docker and the NVIDIA runtime are already there: nothing happens.
set -euo pipefail
want=()
command -v dockerd >/dev/null || want+=(docker.io)
command -v debootstrap >/dev/null || want+=(debootstrap)
command -v npm >/dev/null || want+=(npm)
if [ "${1:-}" = "--test" ]; then
  command -v docker-registry >/dev/null || want+=(docker-registry)
  command -v docker-compose >/dev/null || want+=(docker-compose)
  command -v chromium >/dev/null || want+=(chromium)
  command -v jq >/dev/null || want+=(jq)
fi
if [ ${#want[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "need root to install: ${want[*]}" >&2; exit 1; }
  echo "installing: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "the Docker daemon is not running; start it (sudo systemctl start docker)" >&2; exit 1; }
  echo "starting dockerd"
  (setsid dockerd >/var/log/spark-nvfp4-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/spark-nvfp4-dockerd.log" >&2; exit 1; }
fi
echo "host ready: $(docker version --format 'docker {{.Server.Version}}')"
