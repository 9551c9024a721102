"""Cost of the PAMR read-out refinement (`vilseg.clustering.pamr`, `nbs/07_clustering`) on its own: milliseconds
per image for score maps of a given size and class count, at the demo's setting (10 steps, dilations 1, 2, 4, 8, 12, 24),
for its two computations side by side (each step as one sparse matrix product, the CPU's path; and the sum of the 48
shifted maps, the path on other devices), with the largest difference between their results;
and how that compares with the rest of the read-out on the embedded world (`--world`: the demo checkpoint's
`evaluate` with and without PAMR on the val split).

    .venv/bin/python bench/bench_pamr.py                       # 64 px x 16 classes (the world), 448 px x 20 (a VOC window)
    .venv/bin/python bench/bench_pamr.py --world runs/demo/checkpoint.pt
    .venv/bin/python bench/bench_pamr.py --world runs/demo/checkpoint.pt --scales 1 0.25   # PAMR's placement, side by side

With `--scales`, each placement (`pamr_scale`: 1 = the input size, 0.25 = TCL's quarter size) is evaluated in the same
process on the val split at the background threshold calibrated for it on the train split's calibration images, for
both read-outs (clusters and dense), with the seconds per image of the whole read-out."""
import argparse, json, statistics, time
import torch
import vilseg.clustering as cl
from vilseg.clustering import pamr

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--sizes', type=int, nargs='+', default=[64, 448])
ap.add_argument('--classes', type=int, nargs='+', default=[16, 20], help='one per size')
ap.add_argument('--batch', type=int, nargs='+', default=[32, 1], help='images per call, one per size')
ap.add_argument('--iters', type=int, default=10)
ap.add_argument('--repeats', type=int, default=5)
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
ap.add_argument('--world', default=None, help='a checkpoint: also time evaluate() on data/world val with and without PAMR')
ap.add_argument('--data', default='data/world')
ap.add_argument('--scales', type=float, nargs='+', default=None, help='with --world: compare PAMR at these fractions of the input size')
ap.add_argument('--val-images', type=int, default=500)
ap.add_argument('--calib-images', type=int, default=200)
a = ap.parse_args()
torch.set_num_threads(a.threads)
if not len(a.sizes) == len(a.classes) == len(a.batch): ap.error('--sizes, --classes and --batch need one value each per size')

rows = []
for size, C, B in zip(a.sizes, a.classes, a.batch):
    g = torch.Generator().manual_seed(0)
    img, S = torch.rand(B, 3, size, size, generator=g), torch.randn(B, C, size, size, generator=g)
    outs, ts = {}, {True: [], False: []}
    for r in range(a.repeats + 1):                                         # round 0 warms up; the two paths alternate
        for sparse in (True, False):
            cl.PAMR_SPARSE = sparse
            t = time.perf_counter(); outs[sparse] = pamr(img, S, a.iters); dt = time.perf_counter() - t
            if r: ts[sparse].append(dt)
    cl.PAMR_SPARSE = True
    ms = {k: statistics.median(v) / B * 1000 for k, v in ts.items()}
    rows.append({'size': size, 'classes': C, 'batch': B, 'iters': a.iters, 'ms_per_image': round(ms[True], 2),
                 'ms_per_image_shifted_sum': round(ms[False], 2), 'speedup': round(ms[False] / ms[True], 2),
                 'max_abs_diff': float((outs[True] - outs[False]).abs().max())})
    print(json.dumps(rows[-1]), flush=True)
print(f'\n| scores | sparse product, ms / image | sum of shifted maps, ms / image | speed-up | max abs difference |\n|---|---|---|---|---|')
for r in rows:
    print(f"| {r['batch']} x {r['classes']} x {r['size']}² | {r['ms_per_image']} | {r['ms_per_image_shifted_sum']} | {r['speedup']} | {r['max_abs_diff']:.1e} |")

if a.world and a.scales:
    from vilseg.cli import load_model
    from vilseg.segdata import VOCStyleSegmentation
    from vilseg.evaluate import evaluate, calibrate_threshold
    m, _ = load_model(a.world); val, calib = VOCStyleSegmentation(a.data, 'val'), VOCStyleSegmentation(a.data, 'train')
    m.cfg.pamr_iters = a.iters
    for method in ('cluster', 'dense'):
        for sc in [None] + list(a.scales):                    # None: no PAMR
            m.cfg.pamr_iters, m.cfg.pamr_scale = (0, 1.0) if sc is None else (a.iters, sc)
            th, _ = calibrate_threshold(m, calib, method=method, max_images=a.calib_images, progress=False)
            t = time.perf_counter()
            r = evaluate(m, val, method=method, bg_threshold=th, max_images=a.val_images, progress=False)
            print(json.dumps({'method': method, 'pamr': 'off' if sc is None else f'{a.iters} steps at {sc:g}x',
                              'bg_threshold': th, 'val_miou': round(float(r['miou']), 4), 'images': r['n_images'],
                              'ms_per_image': round((time.perf_counter() - t) / r['n_images'] * 1000, 2)}), flush=True)
elif a.world:
    from vilseg.cli import load_model
    from vilseg.segdata import VOCStyleSegmentation
    from vilseg.evaluate import evaluate
    m, _ = load_model(a.world); val = VOCStyleSegmentation(a.data, 'val')
    for it in (0, a.iters):
        m.cfg.pamr_iters = it
        r = evaluate(m, val, progress=False, bg_threshold=0.1)
        print(json.dumps({'world_eval': a.world, 'pamr_iters': it, 'images': r['n_images'],
                          'images_per_second': round(r['images_per_second'], 1), 'miou_at_0.1': round(float(r['miou']), 4)}), flush=True)
