#!/usr/bin/env bash
# Pack NVIDIA DALI, its codecs and webdataset for the lent GPU machine (Python 3.12, CUDA 13, no package registry)
# into parts small enough for one device call each (a call carries at most 64 MiB): .device/p1 p2 p3, each with
# .ci/stage_dali.sh as its stage.sh. .ci/gpu's header says how the three calls are made.
#
#   bash .ci/pack_dali.sh [EXTRA_WHEEL...]     from the project root; about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.device}
dali=${DALI:-nvidia-dali-cuda130==2.4.0}  # pyproject.toml's DALI, built for CUDA 13 as the device's torch is
wheels=("$dali" nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
        astunparse==1.6.3 gast==0.7.0 optree makefun "libcst~=1.8" nvtx webdataset==1.0.2 braceexpand)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ -d .git ] || [ -f .git ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"
fi
if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" "${wheels[@]}" "$@" > "$work/pip.log" 2>&1
then grep -v '^WARNING: Location' "$work/pip.log" >&2; exit 1; fi
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
find "$work/site" -name '*.cpython-3*' ! -name '*cpython-312*' -delete   # keep only the device's Python
echo "packing $(du -sh "$work/site" | cut -f1) with xz (a few minutes on 2 cores)"
if command -v xz > /dev/null; then
  tar -C "$work/site" -cf - . | xz -T0 -9 > "$work/bundle.tar.xz"
else  # no xz here: Python's lzma, single-threaded
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'w:xz', preset=9).add(sys.argv[2], '.')" \
    "$work/bundle.tar.xz" "$work/site"
fi
rm -rf "$out"; mkdir -p "$out"
(cd "$work" && split -b 57M -d -a 1 bundle.tar.xz part. && sha256sum bundle.tar.xz | cut -d' ' -f1 > sha256)
n=0
for part in "$work"/part.*; do
  n=$((n + 1)); mkdir -p "$out/p$n"; mv "$part" "$out/p$n/"
  cp .ci/stage_dali.sh "$out/p$n/stage.sh"
done
echo "$n" > "$out/p$n/count"; cp "$work/sha256" "$out/p$n/sha256"
[ "$n" -eq 3 ] || echo "note: the bundle came out in $n parts; make $n calls, one per $out/pN"
du -sh "$out"/p*
