# One zone-outage suite invocation: bulwark's figures, from the suite's JSON,
# the kept events.csv and the kept bulwark-lb / bulwark-prober logs.
# Usage: zo-collect.py <variant> <out-dir of the run> ; prints one JSON line.
import csv, glob, json, os, sys, datetime
variant, out = sys.argv[1], sys.argv[2]
j = json.load(open(glob.glob(os.path.join(out, '*.json'))[0]))
r = [x for x in j['runs'] if x['contender'] == 'bulwark'][0]
base = [x for x in j['runs'] if x['contender'] != 'bulwark'][0]
fault = r['markers'][0]['at_ns']
def ts(line):
    t = line.split()[0].rstrip('Z')
    d = datetime.datetime.fromisoformat(t).replace(tzinfo=datetime.timezone.utc)
    return int(d.timestamp() * 1e9)
def after(pattern, files):
    times = []
    for f in files:
        for line in open(f, errors='replace'):
            if pattern in line and line[:4] == '2026':
                t = ts(line)
                if t >= fault:
                    times.append(t)
    return (min(times) - fault) / 1e6 if times else None
lb_logs = glob.glob('/tmp/bulwark-lb-*/lb-*.log')
down = after('verdict committed backend=api-a verdict="down"', lb_logs)
prober_back = []
for f in glob.glob('/tmp/bulwark-prober-[bc]-*/*.log'):
    prober_back.append(after('reporting to the LB leader', [f]))
ev = glob.glob('/tmp/bulwark-suite-*/zone-outage-bulwark/events.csv')[0]
slow = watch_slow = 0
n = 0
for e in csv.DictReader(open(ev)):
    if e['kind'] != 'conn' or e['ok'] != '1' or int(e['start_ns']) < fault:
        continue
    n += 1
    if int(e['end_ns']) - int(e['start_ns']) >= 400e6:
        slow += 1
        if int(e['client']) < r['watchers']:
            watch_slow += 1
avoided = sum(1 for f in lb_logs for l in open(f, errors='replace') if 'new connections prefer the other' in l)
print(json.dumps(dict(variant=variant, all_back_ms=round(r['watch_all_back_ms']), p50_back_ms=round(r['watch_median_back_ms']),
    vip_moved_ms=r['vip_moved_ms'], down_verdict_ms=down, probers_reporting_ms=prober_back,
    connects=n, slow_connects=slow, slow_watch_connects=watch_slow,
    connect_p50_p99=(r['connect_latency_during']['p50_ms'], r['connect_latency_during']['p99_ms']),
    failed_connects=r['failed_connects'], avoidance_logs=avoided,
    baseline_all_back_ms=base['watch_all_back_ms'], baseline_failed_connects=base['failed_connects'])))
