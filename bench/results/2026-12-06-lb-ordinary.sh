#!/bin/sh
# The same bulwark-lb without CAP_SYS_NICE: its SCHED_RR request is refused,
# so every thread runs under the ordinary policy.
exec setpriv --bounding-set -sys_nice "${BULWARK_LB:-target/release/bulwark-lb}" "$@"
