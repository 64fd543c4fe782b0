#!/bin/bash
# A/B suite runs of one scenario, one invocation per variant argument:
# A and B name directories /tmp/binA and /tmp/binB, each holding
# bulwark-bench, the fixture apiserver and that variant's bulwark-lb and
# bulwark-prober. Run from the repository root, as root:
#   bench/results/2026-12-08-connect-race.sh zone-outage A B A B
set -u
scenario=$1
shift
mkdir -p /tmp/race-ab
i=0
for v in "$@"; do
  i=$((i+1))
  rm -rf /tmp/bulwark-*
  out=/tmp/race-ab/$scenario-$i-$v
  mkdir -p $out/kept
  BULWARK_KEEP_TEST_DIRS=1 BULWARK_TOOLS_DIR=.tools /tmp/bin$v/bulwark-bench suite --out-dir $out $scenario > $out/log 2>&1
  cp -r /tmp/bulwark-suite-*/$scenario-bulwark $out/kept/ 2>/dev/null
  for f in /tmp/bulwark-lb-*/lb-*.log /tmp/bulwark-prober-*/*.log; do cp $f $out/kept/ 2>/dev/null; done
  python3 bench/results/2026-12-08-connect-race.py $v $out $scenario >> /tmp/race-ab/results.jsonl 2>> /tmp/race-ab/errors
done
echo done >> /tmp/race-ab/results.jsonl
