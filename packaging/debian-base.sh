#!/usr/bin/env bash
# Usage: debian-base.sh IMAGE
#
# Makes IMAGE, a Python 3 base for the plugin rootfs, from Debian with debootstrap, for hosts that cannot
# pull python:3.11-slim-bookworm (no registry). Needs root and the debootstrap package, and reaches only
# the Debian mirror.
#
# debootstrap takes about a minute, so its tree is kept as a tarball in CACHE_DIR, named by a hash of
# everything that shapes it (suite, mirror, packages, this script). A second run on the same machine only
# re-imports the tarball; a run whose IMAGE already carries that hash does nothing. Delete the tarball to
# pick up newer Debian packages.
#
# Environment: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
# CACHE_DIR (/var/cache/vault-secrets), DOCKER (docker).
set -euo pipefail

die() { echo "debian-base: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 IMAGE"
image=$1
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_dir=${CACHE_DIR:-/var/cache/vault-secrets}
docker=${DOCKER:-docker}
# bookworm's python3 is 3.11, the version the wheels are fetched for (PLUGIN_PYTHON in plugin.mk).
include=python3,python3-venv,ca-certificates
label=io.vault-secrets.base-key

key=$({ printf '%s\n' "$suite" "$mirror" "$include"; cat "$0"; } | sha256sum | cut -c1-16)
if [ "$("$docker" image inspect -f "{{index .Config.Labels \"$label\"}}" "$image" 2>/dev/null)" = "$key" ]; then
    echo "debian-base: $image is up to date ($label=$key)"
    exit 0
fi

tarball=$cache_dir/debian-$suite-$key.tar
if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    mkdir -p "$cache_dir"
    work=$(mktemp -d "$cache_dir/build.XXXXXX")
    # debootstrap mounts /proc and /sys in the tree while it runs: if it dies, unmount them before the
    # removal, and never let rm cross into another file system.
    cleanup() {
        grep -o " $work/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
        rm -rf --one-file-system "$work"
    }
    trap cleanup EXIT
    echo "debian-base: debootstrap $suite from $mirror (about a minute; cached as $tarball)"
    debootstrap --variant=minbase --include="$include" "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || die "debootstrap failed; its log ends with:$(echo; tail -n 20 "$work/debootstrap.log")"
    # Downloaded .debs, package lists, docs and translations are a third of the tree and unused at run time.
    (cd "$work/root" && rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* usr/share/doc usr/share/man \
        usr/share/locale usr/share/info)
    # Device nodes come from the runtime; numeric owners keep the tree independent of the host's users.
    tar -C "$work/root" --numeric-owner --exclude='./dev/*' -cf "$work/root.tar" .
    mv "$work/root.tar" "$tarball"
fi

"$docker" import \
    -c "LABEL $label=$key" \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    "$tarball" "$image" >/dev/null
echo "debian-base: imported $image from $tarball"
