#!/bin/bash
# One call on the GPU machine: unpack the runtime-only TVM, check kernels (CHECK="dir [dir...]"),
# measure each prepared bench folder given as an argument (BUDGET seconds each), ncu on NCU_LAYERS of the
# first folder (once per regex in NCU_KERNELS, default escort_spec); CASES (indices or layer names) limits the bench
# to those cases; everything lands in $OUT/run.tgz. On the build machine first:
#   tar cJf .gpu/devbundle.tar.xz .devbundle   # ~4 MB of carry instead of 23 MB
# then carry [".gpu/devbundle.tar.xz", "<bench folders>", "<CHECK folder>"] and run, e.g.
#   CHECK=.gpu/check BUDGET=300 NCU_LAYERS=vgg16.conv4_2 bash scripts/device_run.sh .gpu/bench_b32
cd "$(dirname "$0")/.." || exit 1  # the repo root
[ -d .devbundle ] || tar xJf .gpu/devbundle.tar.xz
source .devbundle/activate
export PYTHONUNBUFFERED=1
O=/tmp/o; rm -rf $O; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > $O/smi.txt
date -u +%FT%TZ > $O/date.txt
for C in $CHECK; do  # one or more gpu_check folders
  c=check_$(basename $C)
  timeout 150 python3 scripts/gpu_check.py run --dir $C --out $O/$c > $O/$c.log 2>&1
  echo "gpu_check $C rc=$?"; tail -3 $O/$c.log
done
for B in "$@"; do
  n=$(basename $B)
  timeout $((BUDGET + 40)) python3 scripts/bench.py measure --bench-dir $B --out $O/$n --budget-s $BUDGET \
    ${CASES:+--cases $CASES} > $O/$n.log 2>&1
  echo "bench $n rc=$?"; grep -A8 "Best of our kernels" $O/$n/bench.md | head -9
done
for L in $NCU_LAYERS; do
  i=0
  for K in ${NCU_KERNELS:-escort_spec}; do  # one profile per kernel regex (a variant's symbol picks that variant)
    i=$((i + 1)); f=$O/ncu_${L}_$i.txt
    timeout 60 ncu --clock-control none --target-processes all -k regex:$K --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats --print-details all python3 scripts/bench.py measure \
      --bench-dir $1 --cases $L --out /tmp/ncu_$L --no-stream > $f 2>&1
    echo "ncu $L $K rc=$?"; grep -iE "Duration|Throughput|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|stall" $f | head -24
  done
done
tar czf $OUT/run.tgz -C $O .
ls -la $OUT
