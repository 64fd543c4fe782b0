#!/usr/bin/env python3
"""Where each failover trial's election time went, from the LB nodes' logs.

Run the failover bench with the nodes' logs kept and openraft at info:

    TMPDIR=/tmp/logs BULWARK_KEEP_TEST_DIRS=1 BULWARK_LB_LOG_LEVEL='info,openraft=info,bulwark_lb::raft::elector=debug' \
        target/release/bulwark-bench failover --trials 40 --trial-burners 8 \
        --soak-seconds 30 --soak-burners 8 --out-dir /tmp/out

then `python3 2026-12-07-election-steps.py /tmp/logs /tmp/out`. One line per
trial: the bench's gap and detection time, then from the logs of the node
that took the VIP: the pre-vote round (its elector's last campaign to its
new candidacy), the vote round (candidacy to leader), leader to VIP taken,
and the elector's lateness (detection less F + 5 ms less the election). Also
how many nodes campaigned in the trial and how many campaigns openraft
refused locally ("skip pre-elect": the node's own lease still ran).
"""

import glob
import json
import re
import statistics
import sys
from datetime import datetime

F_PLUS_MARGIN_MS = 225.0

EVENTS = [
    ("campaigning", "fire"),
    ("do_elect: new candidate", "candidate"),
    ("becomes leader", "leader"),
    ("took the VIP", "took"),
    ("skip pre-elect", "skip"),
]


def events(logs):
    out = []
    for path in glob.glob(logs + "/bulwark-lb-[0-9]-*/lb-*.log"):
        node = re.search(r"lb-(\d+)\.log", path).group(1)
        for line in open(path):
            m = re.match(r"\S+T(\d\d:\d\d:\d\d\.\d+)Z", line)
            if not m:
                continue
            for needle, kind in EVENTS:
                if needle in line:
                    t = datetime.strptime(m.group(1)[:15], "%H:%M:%S.%f")
                    out.append((t.timestamp() * 1000, node, kind))
    return sorted(out)


def per_trial(evs, trials):
    groups, current = [], []
    for e in evs:
        current.append(e)
        if e[2] == "took":
            groups.append(current)
            current = []
    # The first claim is the cluster's start, not a trial.
    return zip(trials, groups[-len(trials):])


def main(logs, out):
    trials = json.load(open(glob.glob(out + "/*.json")[0]))["trials"]
    steps = {"pre-vote": [], "vote": [], "claim": [], "late": []}
    for trial, group in per_trial(events(logs), trials):
        took_at, winner, _ = group[-1]
        recent = [e for e in group if e[0] > took_at - 600]
        mine = lambda kind: [e[0] for e in recent if e[1] == winner and e[2] == kind]
        fire, cand, leader = mine("fire")[-1], mine("candidate")[-1], mine("leader")[-1]
        campaigners = sorted({e[1] for e in recent if e[2] == "fire"})
        skips = sum(1 for e in recent if e[2] == "skip")
        row = {
            "pre-vote": cand - fire,
            "vote": leader - cand,
            "claim": took_at - leader,
            "late": trial["time_to_detect_ms"] - F_PLUS_MARGIN_MS - (leader - fire),
        }
        for k, v in row.items():
            steps[k].append(v)
        print(
            f"{trial['trial']:3} gap {trial['gap_ms']:4.0f} detect {trial['time_to_detect_ms']:4.0f} ms | "
            + " ".join(f"{k} {v:5.1f}" for k, v in row.items())
            + f" | campaigned: {','.join('n' + c for c in campaigners)} | skipped locally: {skips}"
        )
    for k, v in steps.items():
        v.sort()
        print(f"{k}: median {statistics.median(v):.1f} ms, p90 {v[int(0.9 * len(v)) - 1]:.1f} ms, max {v[-1]:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
