#!/bin/sh
# bulwark-lb with the Raft and VIP timers of before 2026-12-06's change
# (raft.heartbeatInterval 50 ms, raft.electionTimeoutMax 250 ms, vip.lease
# 180 ms), for side-by-side runs of the suite, which has no timer flags:
# rewrites the config it is given (`--config FILE`) into FILE.old-timers.
[ "$1" = "--config" ] || { echo "expected --config FILE" >&2; exit 2; }
old="$2.old-timers"
sed -e '/^raft:/,/^[^ ]/ s/^\(  heartbeatInterval:\).*/\1 50ms/' \
    -e '/^raft:/,/^[^ ]/ s/^\(  electionTimeoutMax:\).*/\1 250ms/' \
    -e '/^vip:/,/^[^ ]/ s/^\(  lease:\).*/\1 180ms/' "$2" > "$old"
shift 2
exec "${BULWARK_LB:-target/release/bulwark-lb}" --config "$old" "$@"
