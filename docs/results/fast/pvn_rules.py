"""Pneumonia-vs-normal threshold rules chosen on val, read on the test half (docs/results/fast.md,
"Pneumonia vs normal: the threshold is not what limits"; it looks at the test half). Reads each
run's predictions_val.csv and predictions_test.csv (3-class runs: p = 1 - p(normal)).
    python docs/results/fast/pvn_rules.py 'outputs/fast/screening_bn_onecycle_18ep_*'"""
import csv
import glob
import sys

import numpy as np

def load(path):
    rows = list(csv.DictReader(open(path)))
    y = np.array([int(r["label"]) != 0 for r in rows])
    p = np.array([1 - float(r["p_normal"]) for r in rows])
    return y, p

def rates(y, p, t):
    pred = p >= t
    sens = (pred & y).sum() / y.sum(); spec = (~pred & ~y).sum() / (~y).sum()
    return sens, spec, (pred == y).mean()

def sens_rule(y, p, target):
    ts = np.sort(np.unique(p))[::-1]
    for t in ts:  # the highest threshold whose val sensitivity reaches the target
        if rates(y, p, t)[0] >= target:
            return t
    return ts[-1]

def youden(y, p):
    ts = np.unique(p)
    return max(ts, key=lambda t: sum(rates(y, p, t)[:2]))

rules = {
    "sens>=0.93": lambda y, p: sens_rule(y, p, 0.93),
    "sens>=0.90": lambda y, p: sens_rule(y, p, 0.90),
    "sens>=0.85": lambda y, p: sens_rule(y, p, 0.85),
    "youden": youden,
    "0.5": lambda y, p: 0.5,
    "2/3 (prior)": lambda y, p: 2 / 3,
    "0.8": lambda y, p: 0.8,
    "0.9": lambda y, p: 0.9,
}
runs = sorted(f"{d}/predictions_test.csv" for d in glob.glob(sys.argv[1]))
table = {r: [] for r in rules}
for f in runs:
    name = f.split("/")[-2]
    yv, pv = load(f.replace("_test", "_val")); yt, pt = load(f)
    line = [name[:40]]
    for r, rule in rules.items():
        t = rule(yv, pv); s, sp, a = rates(yt, pt, t)
        table[r].append((s, sp, a)); line.append(f"{r}: t={t:.2f} se={s:.3f} sp={sp:.3f}")
    print(" | ".join(line))
print()
for r, v in table.items():
    v = np.array(v); print(f"{r:12s} mean sens {v[:,0].mean():.3f} spec {v[:,1].mean():.3f} acc {v[:,2].mean():.3f}  min spec {v[:,1].min():.3f}")
