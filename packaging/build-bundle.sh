#!/usr/bin/env bash
# Usage: build-bundle.sh OUT_DIR
#
# Builds the managed plugin's bundle, OUT_DIR/bundle/{config.json,rootfs/}, ready for
# `docker plugin create NAME OUT_DIR/bundle`. Run from the repository top (make plugin-rootfs does).
#  1. wheels: the project's wheel (built from a copy of the sources, so setuptools' scratch files stay
#     out of the tree) and its locked dependencies as binary wheels for PLUGIN_PYTHON, fetched on this host;
#  2. docker build of packaging/Dockerfile on BASE_IMAGE, installing those wheels offline;
#  3. docker export of that image into rootfs/, plus config.json.
#
# Environment: PY (a Python with pip), BASE_IMAGE, PLUGIN_PYTHON (3.11), DOCKER (docker),
# ROOTFS_IMAGE (the intermediate image's tag).
set -euo pipefail

die() { echo "build-bundle: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
out=$1
py=${PY:-python3}
docker=${DOCKER:-docker}
base_image=${BASE_IMAGE:-python:3.11-slim-bookworm}
python_version=${PLUGIN_PYTHON:-3.11}
rootfs_image=${ROOTFS_IMAGE:-vault-secrets-plugin-rootfs:build}
[ -f config.json ] && [ -f packaging/Dockerfile ] || die "run from the repository top"

rm -rf "$out/src" "$out/context" "$out/bundle"
mkdir -p "$out/src" "$out/context/wheels" "$out/bundle/rootfs"

tar -c --exclude=__pycache__ pyproject.toml README.md plugin | tar -x -C "$out/src"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$out/context/wheels" "$out/src"
# The dependencies exactly as locked (versions and hashes: packaging/requirements.lock, `make lock`), as
# binary wheels for the image's Python, whatever Python this host runs: nothing is compiled in the image.
# They match this host's platform; the Dockerfile's import check catches a glibc newer than the base's.
"$py" -m pip download --quiet --only-binary=:all: --python-version "$python_version" --no-deps --require-hashes \
    --dest "$out/context/wheels" -r packaging/requirements.lock

if ! "$docker" image inspect "$base_image" >/dev/null 2>&1 && ! "$docker" pull "$base_image"; then
    die "base image $base_image is neither present nor pullable; without a registry run" \
        "\`make plugin-base\` and then pass BASE_IMAGE=vault-secrets-base:bookworm"
fi
"$docker" build --build-arg "BASE_IMAGE=$base_image" -f packaging/Dockerfile -t "$rootfs_image" "$out/context"

container=$("$docker" create "$rootfs_image" /bin/true)
trap '"$docker" rm "$container" >/dev/null' EXIT
"$docker" export "$container" | tar -x -C "$out/bundle/rootfs"
cp config.json "$out/bundle/config.json"
echo "build-bundle: $out/bundle is ready for \`docker plugin create NAME $out/bundle\`"
