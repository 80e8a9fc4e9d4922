#!/usr/bin/env bash
# The main job on the bundled samples: inspect, strip-prefix, extract, diff, bn-to-gn, fold-bn, verify.
set -euo pipefail
cd "$(dirname "$0")"
S=out
M=models.py
run() { echo; echo "\$ $*"; "$@"; }
run ckpt-surgeon inspect $S/seednet_dp.pt
run ckpt-surgeon inspect $S/seednet_lightning.ckpt --depth 1
run ckpt-surgeon strip-prefix $S/seednet_dp.pt -o $S/demo_stripped.pt
run ckpt-surgeon strip-prefix $S/seednet_lightning.ckpt -o $S/demo_from_lightning.safetensors
run ckpt-surgeon verify $S/seednet_dp.pt $S/demo_stripped.pt --model $M:seednet
run ckpt-surgeon extract $S/seednet_resume.pt -o $S/demo_backbone.pt --layers conv1,bn1,conv2,in2 --exclude in2
run ckpt-surgeon rename $S/seednet.pt --map '^fc\.=>head.' --dry-run
run ckpt-surgeon diff $S/seednet_resume.pt $S/seednet_finetuned.pt || true
run ckpt-surgeon diff $S/seednet.pt $S/seednet_hf
run ckpt-surgeon bn-to-gn $S/seednet.pt -o $S/demo_gn.pt --model $M:seednet --groups 32 --groups-policy nearest --calibrate 64 --input-shape 3,16,16
run ckpt-surgeon verify $S/seednet.pt $S/demo_gn.pt --model $M:seednet || true
run ckpt-surgeon fold-bn $S/bnnet.pt -o $S/demo_folded.pt --model $M:bnnet
run ckpt-surgeon verify $S/bnnet.pt $S/demo_folded.pt --model $M:bnnet
run ckpt-surgeon merge-lora $S/seednet.pt $S/seednet_lora -o $S/demo_merged.safetensors
run ckpt-surgeon diff $S/seednet.pt $S/demo_merged.safetensors || true
run ckpt-surgeon extract-lora $S/seednet.pt $S/demo_merged.safetensors -o $S/demo_extracted_lora --rank 4
run ckpt-surgeon scan $S/seednet_resume.pt
echo; echo "demo finished"
