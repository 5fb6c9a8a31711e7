#!/usr/bin/env bash
# The full test suite. Installs what it needs (Debian packages) when missing, then
# checks formatting and lints and runs every test. Fails loudly: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
command -v kubectl >/dev/null 2>&1 || need_pkgs+=(kubernetes-client)
# Real containers: containerd + runc, a loopback registry, busybox for test images.
command -v containerd >/dev/null 2>&1 || need_pkgs+=(containerd)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need_pkgs+=(runc)
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)  # static: it runs inside images
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "==> installing missing packages: ${need_pkgs[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}"
fi
for tool in etcd protoc kubectl cargo containerd docker-registry busybox; do
  command -v "$tool" >/dev/null 2>&1 || { echo "FATAL: $tool is required and could not be installed" >&2; exit 1; }
done

# A one-shot build gains nothing from incremental state, which is most of target/'s size.
export CARGO_INCREMENTAL=0

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads 2
echo "==> all tests passed"
