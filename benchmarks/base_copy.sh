#!/usr/bin/env bash
# A revision's specmoe_ray package (without the demo model's weights) in a folder of its own, for
# `BASE_DIR=<folder> bash benchmarks/run_gpu.sh probe`: timed beside the working tree in one call.
#   bash benchmarks/base_copy.sh HEAD~3 .gpu/base    # .gpu/ is ignored (.git/info/exclude); carry it
set -euo pipefail
rev=${1:?usage: base_copy.sh REV DIR}
dir=${2:?usage: base_copy.sh REV DIR}
rm -rf "$dir" && mkdir -p "$dir"
git archive "$rev" specmoe_ray | tar -x -C "$dir" --exclude='specmoe_ray/demo/target' --exclude='specmoe_ray/demo/draft'
echo "$rev ($(git rev-parse --short "$rev")) -> $dir: $(du -sh "$dir" | cut -f1)"
