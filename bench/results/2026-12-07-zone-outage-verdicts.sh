#!/bin/bash
# A/B zone-outage runs, one suite invocation per argument: A and B name
# directories /tmp/binA and /tmp/binB, each holding bulwark-bench, the
# fixture apiserver and that variant's bulwark-lb and bulwark-prober.
# Run from the repository root, as root.
set -u
mkdir -p /tmp/zo-ab
i=0
for v in "$@"; do
  i=$((i+1))
  rm -rf /tmp/bulwark-*
  out=/tmp/zo-ab/$i-$v
  mkdir -p $out
  BULWARK_KEEP_TEST_DIRS=1 BULWARK_TOOLS_DIR=.tools /tmp/bin$v/bulwark-bench suite --out-dir $out zone-outage > $out/log 2>&1
  python3 bench/results/2026-12-07-zone-outage-verdicts.py $v $out >> /tmp/zo-ab/results.jsonl 2>> /tmp/zo-ab/errors
  mkdir -p $out/kept && cp -r /tmp/bulwark-suite-*/zone-outage-bulwark $out/kept/ 2>/dev/null
  for f in /tmp/bulwark-lb-*/lb-*.log /tmp/bulwark-prober-*/*.log; do cp $f $out/kept/ 2>/dev/null; done
done
echo done >> /tmp/zo-ab/results.jsonl
