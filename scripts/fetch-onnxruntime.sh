#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that `ort` (feature api-31) loads at run time.
# It comes from the pinned PyPI wheel, the only place our machines can reach that ships it.
# Idempotent: does nothing when the library is already in place.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.ort"
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [[ -f "$lib" ]]; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$tmp" "onnxruntime==$ORT_VERSION"
wheel="$(ls "$tmp"/onnxruntime-*.whl)"
mkdir -p "$dest"
python3 - "$wheel" "$dest" "$ORT_VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    (dest / f"libonnxruntime.so.{version}").write_bytes(z.read(name))
PY
echo "ONNX Runtime $ORT_VERSION -> $lib"
