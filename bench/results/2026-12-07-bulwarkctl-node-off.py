import subprocess,time,statistics,sys
D='/tmp/bulwark-bulwark-demo-yipfeX/bulwarkctl.yaml'
cmds=[['lb','members'],['backup','list'],['status'],['health']]
rows=[]
for ctx,name in [(D,'all up'),('/tmp/ctx-off.yaml','first endpoint off (SYN dropped)')]:
    for cmd in cmds:
        res={}
        for b in ['old','new']:
            ts=[];rcs=set()
            for i in range(5):
                t=time.monotonic()
                p=subprocess.run([f'/tmp/bulwarkctl-{b}','--config',ctx]+cmd,capture_output=True)
                ts.append(time.monotonic()-t); rcs.add(p.returncode)
            res[b]=(statistics.median(ts),min(ts),max(ts),rcs)
        print(f"| {name} | `bulwarkctl {' '.join(cmd)}` | {res['old'][0]:.2f} s ({res['old'][1]:.2f}-{res['old'][2]:.2f}), exit {sorted(res['old'][3])} | {res['new'][0]:.2f} s ({res['new'][1]:.2f}-{res['new'][2]:.2f}), exit {sorted(res['new'][3])} |",flush=True)
