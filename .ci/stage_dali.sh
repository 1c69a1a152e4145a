#!/usr/bin/env bash
# On the GPU machine (copied into each part by .ci/pack_dali.sh as stage.sh): keep this part in /tmp/dali-parts; the
# last part checks the bundle's sha256 and unpacks it into /tmp/site, where .ci/gpu's PYTHONPATH finds it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/dali-parts && cp "$here"/part.* /tmp/dali-parts/
[ -f "$here/count" ] || { echo "staged $(ls /tmp/dali-parts | wc -l) part(s)"; exit 0; }
if [ -d /tmp/site/nvidia/dali ]; then echo "DALI already installed in /tmp/site"; exit 0; fi
have=$(ls /tmp/dali-parts | wc -l); want=$(cat "$here/count")
if [ "$have" -ne "$want" ]; then
  echo "only $have of $want parts on this machine: it went cold between calls; send all parts again, back to back" >&2
  exit 3
fi
cat /tmp/dali-parts/part.* > /tmp/dali.tar.xz
echo "$(cat "$here/sha256")  /tmp/dali.tar.xz" | sha256sum -c --quiet
mkdir -p /tmp/site
if command -v xz > /dev/null; then
  tar -C /tmp/site -xJf /tmp/dali.tar.xz
else  # no xz there: Python's lzma
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" /tmp/dali.tar.xz /tmp/site
fi
rm /tmp/dali.tar.xz
PYTHONPATH=/tmp/site python3 -c "import nvidia.dali, webdataset; print('DALI', nvidia.dali.__version__, 'in /tmp/site')"
