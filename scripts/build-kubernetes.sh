#!/usr/bin/env bash
# Build kube-apiserver from the Go module proxy and cache it by version, so a machine builds it
# once (~3.5 min and ~2 GB of memory on 2 cores, 146 MB binary) and every later call only checks
# it with `--version`. The kubernetes engine's tests start it against Debian's etcd.
#
# Why from source: no Kubernetes binaries are packaged for Debian 12 and prebuilt ones cannot be
# fetched here, but the Go module proxy serves k8s.io/kubernetes. Its go.mod points its 31
# `k8s.io/*` staging modules at `./staging/src/...` directories, which a module that requires it
# cannot see, so each gets a `replace` by the published `k8s.io/<name> v0.<minor>.<patch>`; the
# list is read from the downloaded go.mod itself, so a new version needs only VERSION changed.
# CGO_ENABLED=0 gives a static binary that needs nothing from the host.
#
# Usage: scripts/build-kubernetes.sh [--cached] [component...]
#          prints each cached binary's path, one a line (builds what is absent; with --cached,
#          fails instead: what tests use to find the binaries without ever building them);
#          components default to kube-apiserver (kube-scheduler, kube-controller-manager and
#          kubelet build the same way, ~1 min more each with a warm cache).
# Env:   SANDLOT_KUBERNETES_CACHE  cache root (default /var/cache/sandlot/kubernetes)
#        GO                        the go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

VERSION=v1.34.4
STAGING_VERSION=v0.${VERSION#v1.}
CACHE=${SANDLOT_KUBERNETES_CACHE:-/var/cache/sandlot/kubernetes}
CACHED_ONLY=0
if [ "${1:-}" = --cached ]; then
  CACHED_ONLY=1
  shift
fi
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -gt 0 ] || COMPONENTS=(kube-apiserver)

missing=()
for c in "${COMPONENTS[@]}"; do
  case $c in
    kube-apiserver | kube-scheduler | kube-controller-manager | kubelet) ;;
    *) echo "build-kubernetes.sh: unknown component $c" >&2; exit 2 ;;
  esac
  dest="$CACHE/$VERSION/$c"
  if ! { [ -x "$dest" ] && "$dest" --version >/dev/null 2>&1; }; then
    missing+=("$c")
  fi
done

if [ ${#missing[@]} -gt 0 ] && [ $CACHED_ONLY = 1 ]; then
  echo "build-kubernetes.sh: not built yet: ${missing[*]}" >&2
  exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
  GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
  if [ ! -x "$GO" ] && ! command -v "$GO" >/dev/null; then
    echo "build-kubernetes.sh: no Go toolchain found (set GO=...)" >&2
    exit 1
  fi
  export HOME=${HOME:-/root}  # go keeps its module and build caches there (CI may not set it)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  start=$(date +%s)
  echo "==> building ${missing[*]} $VERSION (once per machine; takes a few minutes)" >&2
  printf 'module sandlot.local/kubernetes-build\n\ngo 1.24\n\nrequire k8s.io/kubernetes %s\n' \
    "$VERSION" >go.mod
  upstream_mod=$("$GO" mod download -json "k8s.io/kubernetes@$VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  staging=$(sed -n 's|^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*|\1|p' "$upstream_mod")
  if [ -z "$staging" ]; then
    echo "build-kubernetes.sh: no staging modules found in $upstream_mod" >&2
    exit 1
  fi
  for m in $staging; do
    echo "replace $m => $m $STAGING_VERSION" >>go.mod
  done
  {
    printf '//go:build tools\n\npackage tools\n\n'
    for c in "${missing[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$c\""; done
  } >tools.go
  "$GO" mod tidy >&2
  mkdir -p "$CACHE/$VERSION"
  # The version a release build stamps in (clients and `--version` show it; v0.0.0 otherwise).
  minor=${VERSION#v1.}
  minor=${minor%%.*}
  ldversion="-X k8s.io/component-base/version.gitVersion=$VERSION"
  ldversion+=" -X k8s.io/component-base/version.gitMajor=1"
  ldversion+=" -X k8s.io/component-base/version.gitMinor=$minor"
  ldversion+=" -X k8s.io/component-base/version.gitTreeState=clean"
  for c in "${missing[@]}"; do
    CGO_ENABLED=0 "$GO" build -trimpath -ldflags="-s -w $ldversion" -o "$c" \
      "k8s.io/kubernetes/cmd/$c" >&2
    "./$c" --version >/dev/null
    install -m 0755 "$c" "$CACHE/$VERSION/$c.tmp.$$"
    mv -f "$CACHE/$VERSION/$c.tmp.$$" "$CACHE/$VERSION/$c"
  done
  echo "==> ${missing[*]} built in $(( $(date +%s) - start )) s" >&2
fi
for c in "${COMPONENTS[@]}"; do echo "$CACHE/$VERSION/$c"; done
