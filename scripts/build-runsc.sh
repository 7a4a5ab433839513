#!/usr/bin/env bash
# Build gVisor's runsc from the Go module proxy and cache it by version, so a machine builds it
# once (1-3 min on 2 cores) and every later setup only checks it with `runsc --version`.
#
# Why from source: gVisor ships no Debian package and prebuilt binaries cannot be fetched here.
# The pinned pseudo-version is a commit of gVisor's `go` branch (the Go-buildable one) that
# compiles with Go 1.26; newer ones may be refused by the proxy, older ones do not compile.
# CGO_ENABLED=0 is required: a cgo build fails at start ("error executing umounter").
#
# Usage: scripts/build-runsc.sh            prints the cached binary's path (builds it if absent)
# Env:   SANDLOT_RUNSC_CACHE  cache root (default /var/cache/sandlot/runsc)
#        GO                   the go binary (default: `go` on PATH, else /usr/local/go/bin/go)
set -euo pipefail

VERSION=v0.0.0-20260518063529-209a0ce076a1
CACHE=${SANDLOT_RUNSC_CACHE:-/var/cache/sandlot/runsc}
DEST="$CACHE/$VERSION/runsc"

if [ -x "$DEST" ] && "$DEST" --version >/dev/null 2>&1; then
  echo "$DEST"
  exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
if [ ! -x "$GO" ] && ! command -v "$GO" >/dev/null; then
  echo "build-runsc.sh: no Go toolchain found (set GO=...)" >&2
  exit 1
fi

export HOME=${HOME:-/root}  # go keeps its module and build caches there (CI may not set it)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
cat >go.mod <<MOD
module sandlot.local/runsc-build

go 1.24

require gvisor.dev/gvisor $VERSION
MOD
cat >tools.go <<'SRC'
//go:build tools

package tools

import _ "gvisor.dev/gvisor/runsc"
SRC
start=$(date +%s)
echo "==> building runsc $VERSION (once per machine; takes a few minutes)" >&2
"$GO" mod tidy >&2
CGO_ENABLED=0 "$GO" build -trimpath -ldflags='-s -w' -o runsc gvisor.dev/gvisor/runsc >&2
./runsc --version >/dev/null
mkdir -p "$(dirname "$DEST")"
install -m 0755 runsc "$DEST.tmp.$$"
mv -f "$DEST.tmp.$$" "$DEST"
echo "==> runsc built in $(( $(date +%s) - start )) s, $(du -m "$DEST" | cut -f1) MB" >&2
echo "$DEST"
