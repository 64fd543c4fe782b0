# One suite invocation (zone-outage or reconnect-storm): bulwark's figures
# from the suite's JSON and what the .sh kept under <out>/kept: the load
# driver's events.csv and the bulwark-lb logs.
# Usage: 2026-12-08-connect-race.py <variant> <out-dir of the run> <scenario>
# Prints one JSON line.
import csv, glob, json, os, sys
variant, out, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
j = json.load(open(glob.glob(os.path.join(out, '*.json'))[0]))
r = [x for x in j['runs'] if x['contender'] == 'bulwark'][0]
base = [x for x in j['runs'] if x['contender'] != 'bulwark'][0]
fault = r['markers'][0]['at_ns']
ev = os.path.join(out, 'kept', f'{scenario}-bulwark', 'events.csv')
# Successful client connects started after the fault, by client kind
# (watch streams reconnecting at the VIP move, or per-request clients).
counts = {k: dict(n=0, ge100=0, ge400=0, max_ms=0.0) for k in ('watch', 'request')}
for e in csv.DictReader(open(ev)):
    if e['kind'] != 'conn' or e['ok'] != '1' or int(e['start_ns']) < fault:
        continue
    c = counts['watch' if int(e['client']) < r['watchers'] else 'request']
    ms = (int(e['end_ns']) - int(e['start_ns'])) / 1e6
    c['n'] += 1
    c['ge100'] += ms >= 100
    c['ge400'] += ms >= 400
    c['max_ms'] = round(max(c['max_ms'], ms), 1)
lb_logs = glob.glob(os.path.join(out, 'kept', 'lb-*.log'))
def count(pattern):
    return sum(1 for f in lb_logs for l in open(f, errors='replace') if pattern in l)
print(json.dumps(dict(variant=variant, scenario=scenario,
    all_back_ms=round(r['watch_all_back_ms']), p50_back_ms=round(r['watch_median_back_ms']),
    vip_moved_ms=r['vip_moved_ms'], connects=counts,
    connect_p50_p99=(r['connect_latency_during']['p50_ms'], r['connect_latency_during']['p99_ms']),
    failed_connects=r['failed_connects'],
    avoidances=count('new connections prefer the other'),
    avoidances_overtaken=count('reason="overtaken"'),
    baseline_all_back_ms=base['watch_all_back_ms'], baseline_failed_connects=base['failed_connects'])))
