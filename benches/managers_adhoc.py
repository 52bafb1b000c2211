"""Managers, ferromp vs the stdlib, in one run (ad hoc; the official rows belong in
bench.py).

Each measurement runs in a fresh interpreter that imports only the library under
test; the two libraries alternate, three runs each, and the table shows medians and
the ratio ferromp/stdlib (for ops/s a ratio above 1 means ferromp is faster; for
times, below 1).

    python benches/managers_adhoc.py fork spawn forkserver
"""

import json
import os
import statistics
import subprocess
import sys
import time

N = 3000


def child_dict(d, n, out):
    t = time.perf_counter()
    for i in range(n):
        d['k'] = i
        d['k']
    out.send(time.perf_counter() - t)


def worker(lib, method):
    mp = __import__(lib)
    ctx = mp.get_context(method)
    res = {}
    starts = []
    for _ in range(8):
        t = time.perf_counter()
        m = ctx.Manager()
        t1 = time.perf_counter()
        m.shutdown()
        starts.append((t1 - t, time.perf_counter() - t))
    res['start_s'] = statistics.median(s for s, _ in starts)
    res['start_shutdown_s'] = statistics.median(s for _, s in starts)

    m = ctx.Manager()
    d = m.dict()
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child_dict, args=(d, N, w))
    p.start()
    res['child_dict_ops_per_s'] = 2 * N / r.recv()
    p.join()

    lock = m.Lock()
    for _ in range(200):
        lock.acquire()
        lock.release()
    t = time.perf_counter()
    for _ in range(N):
        lock.acquire()
        lock.release()
    res['lock_pair_us'] = (time.perf_counter() - t) / N * 1e6

    t = time.perf_counter()
    for _ in range(200):
        m.list()
    res['create_us'] = (time.perf_counter() - t) / 200 * 1e6
    m.shutdown()
    print(json.dumps(res))


def main(methods):
    here = os.path.dirname(os.path.abspath(__file__))
    for method in methods:
        runs = {'multiprocessing': [], 'ferromp': []}
        for _ in range(3):
            for lib in runs:
                out = subprocess.run(
                    [sys.executable, os.path.join(here, 'managers_adhoc.py'),
                     'worker', lib, method],
                    capture_output=True, text=True, timeout=300, cwd=here, check=True)
                runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f'--- {method}')
        for key in runs['ferromp'][0]:
            std = statistics.median(r[key] for r in runs['multiprocessing'])
            fm = statistics.median(r[key] for r in runs['ferromp'])
            print(f'{key:22s} stdlib {std:12.4g}  ferromp {fm:12.4g}  '
                  f'ferromp/stdlib {fm / std:6.3f}')


if __name__ == '__main__':
    if sys.argv[1:2] == ['worker']:
        worker(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:] or ['fork'])
