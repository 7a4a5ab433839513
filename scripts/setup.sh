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

# Third-party binaries built from the Go module proxy once per machine, cached by version:
# - runsc, gVisor's runtime (the `gvisor` runtime; scripts/build-runsc.sh, ~3 min on a fresh
#   2-core machine), put on PATH for the local engine. SANDLOT_SKIP_RUNSC=1 skips it: gvisor
#   sandboxes are then refused with an error naming the script, and their tests skip.
# - kube-apiserver, for the kubernetes engine's tests (scripts/build-kubernetes.sh, ~3.5 min).
#   SANDLOT_SKIP_KUBERNETES=1 skips it; those tests then skip, saying so.
# A failed build does not stop the setup (crun and the local engine need neither). The builds
# are CPU-bound, so they run one after the other in the background while the venv and the
# default image (mostly downloads and dpkg) are made.
builds=$(mktemp -d /tmp/sandlot-setup.XXXXXX)
go_builds=
trap 'if [ -n "$go_builds" ]; then kill "$go_builds" 2>/dev/null || true; fi; rm -rf "$builds"' EXIT
(
  if [ "${SANDLOT_SKIP_RUNSC:-0}" != 1 ]; then
    if scripts/build-runsc.sh >"$builds/runsc.path" 2>"$builds/runsc.log"; then rc=0; else rc=1; fi
    echo "$rc" >"$builds/runsc.rc"
  fi
  if [ "${SANDLOT_SKIP_KUBERNETES:-0}" != 1 ]; then
    if scripts/build-kubernetes.sh >/dev/null 2>"$builds/kubernetes.log"; then rc=0; else rc=1; fi
    echo "$rc" >"$builds/kubernetes.rc"
  fi
) &
go_builds=$!

finish_go_builds() {
  wait "$go_builds" || true
  go_builds=
  if [ -f "$builds/runsc.rc" ]; then
    if [ "$(cat "$builds/runsc.rc")" = 0 ]; then
      cat "$builds/runsc.log" >&2
      ln -sfn "$(cat "$builds/runsc.path")" /usr/local/bin/runsc
    else
      tail -n 30 "$builds/runsc.log" >&2
      echo "==> WARNING: runsc did not build; the gvisor runtime is unavailable (rerun" \
        "scripts/build-runsc.sh to see why)" >&2
    fi
  fi
  if [ -f "$builds/kubernetes.rc" ]; then
    if [ "$(cat "$builds/kubernetes.rc")" = 0 ]; then
      cat "$builds/kubernetes.log" >&2
    else
      tail -n 30 "$builds/kubernetes.log" >&2
      echo "==> WARNING: kube-apiserver did not build; the kubernetes engine's tests will skip" \
        "(rerun scripts/build-kubernetes.sh to see why)" >&2
    fi
  fi
}

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

finish_go_builds
