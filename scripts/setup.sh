#!/usr/bin/env bash
# Set up sandlot on a fresh Debian/Ubuntu machine: system packages, the virtualenv, the default
# image. Idempotent: a second run only checks. Needs root (the local engine runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh needs root (apt packages, and the local engine mounts and creates cgroups)" >&2
  exit 1
fi

# What the local engine and its tests use:
#   crun (runc as fallback)  OCI runtimes           mmdebstrap            builds the default image
#   python3.11 + stdlib      the agent's runtime    busybox-static        pid 1 in every sandbox
#   patchelf                 makes the runtime relocatable               (and the tiny test image)
#   uidmap/util-linux        user namespaces        umoci                 OCI image layouts
#   passt, slirp4netns       outbound networking    postgresql            server store tests
#   nftables                 egress policies        iproute2              network tests (peer hosts)
#   skopeo                   registry pulls         docker-registry       a local registry for tests
#   etcd-server              the kubernetes engine's tests (with kube-apiserver, built below)
#   (and runsc, gVisor's runtime, built below from the Go module proxy)
PACKAGES=(crun runc mmdebstrap python3.11-minimal libpython3.11-stdlib patchelf
          busybox-static umoci uidmap passt slirp4netns postgresql python3-venv
          nftables iproute2 e2fsprogs util-linux skopeo docker-registry etcd-server)
PACKAGES+=(podman docker.io)  # python -m bench compares sandlot with them (daemon started by the bench)
PACKAGES+=(catatonit)  # podman kube play's pause container (the kubernetes engine's Pod spec test)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own registry on 127.0.0.1; the package's service (all interfaces,
  # port 5000) is not wanted.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
  # Likewise etcd: the kubernetes tests start their own, on free 127.0.0.1 ports.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

# gVisor's runsc (the `gvisor` runtime): built from source once per machine, cached by version
# (scripts/build-runsc.sh), and put on PATH for the local engine. SANDLOT_SKIP_RUNSC=1 skips it
# (then gvisor sandboxes are refused with an error naming this script, and their tests skip).
# A failed build does not stop the setup: crun stays the default runtime, and the gvisor one
# says what is missing. The build (CPU-bound, ~3 min on a fresh 2-core machine) runs in the
# background while the venv and the default image (mostly downloads and dpkg) are made.
builds=$(mktemp -d /tmp/sandlot-setup.XXXXXX)
trap 'if [ -n "${runsc_build:-}" ]; then kill "$runsc_build" 2>/dev/null || true; fi; rm -rf "$builds"' EXIT
runsc_build=
if [ "${SANDLOT_SKIP_RUNSC:-0}" != 1 ]; then
  scripts/build-runsc.sh >"$builds/runsc.path" 2>"$builds/runsc.log" &
  runsc_build=$!
fi

finish_runsc() {
  [ -n "$runsc_build" ] || return 0
  if wait "$runsc_build"; then
    cat "$builds/runsc.log" >&2
    ln -sfn "$(cat "$builds/runsc.path")" /usr/local/bin/runsc
  else
    tail -n 30 "$builds/runsc.log" >&2
    echo "==> WARNING: runsc did not build; the gvisor runtime is unavailable (rerun" \
      "scripts/build-runsc.sh to see why)" >&2
  fi
}

# kube-apiserver for the kubernetes engine's tests: built from the Go module proxy once per
# machine (~3.5 min on 2 cores; cached by version, scripts/build-kubernetes.sh).
# SANDLOT_SKIP_KUBERNETES=1 skips it; a failed build leaves the setup going and those tests
# skip, saying so.
if [ "${SANDLOT_SKIP_KUBERNETES:-0}" != 1 ]; then
  if ! scripts/build-kubernetes.sh >/dev/null; then
    echo "==> WARNING: kube-apiserver did not build; the kubernetes engine's tests will skip" \
      "(rerun scripts/build-kubernetes.sh to see why)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
echo "==> installing sandlot into .venv"
.venv/bin/pip install -q -e '.[dev]'

echo "==> building the default image (cached after the first run)"
.venv/bin/python -m sandlot.images build

finish_runsc
