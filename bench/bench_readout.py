"""What each part of the read-out costs, side by side in one process, as ratios to the bare dense forward (the image
tower's patch embeddings alone), on `make demo`'s checkpoint:

1. the world: `--images` val images (64 px) in one batch: `scores()` dense and clusters, with and without the
   per-image refit (5 EM steps) and PAMR (10 steps, at the input size and at half of it);
2. a real-size image: one 640x480 image through the `coco_object` preset's path (short side 448 -> 597x448, windows
   448 / stride 224: two windows, 80 classes + background), the demo's read-out, in images/s; the class embeddings
   are computed once beforehand (they are cached per class list in practice).

Medians over `--repeats` timed rounds after a warm-up round; the settings alternate within each round.

    .venv/bin/python bench/bench_readout.py                      # runs/demo/checkpoint.pt, 64 val images
    .venv/bin/python bench/bench_readout.py --repeats 5 --real-repeats 1"""
import argparse, json, statistics, time
import torch
from vilseg.protocols import load_model, get_templates
from vilseg.segdata import VOCStyleSegmentation, read_class_names, class_names_file
from vilseg.encoders import image_features
from vilseg.evaluate import slide_scores, _resize_short
from vilseg.views import normalize

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--checkpoint', default='runs/demo/checkpoint.pt')
ap.add_argument('--data', default='data/world')
ap.add_argument('--images', type=int, default=64)
ap.add_argument('--repeats', type=int, default=5)
ap.add_argument('--real-repeats', type=int, default=2)
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads)

from pathlib import Path
if Path(a.checkpoint).is_file(): m, _ = load_model(a.checkpoint)
else:                                   # the costs do not depend on the weights: an untrained model of the demo's shape
    from vilseg.train import TrainConfig
    from vilseg.vilseg import ViLSeg
    print(f'{a.checkpoint} not found: timing an untrained model of the demo recipe (make demo trains one)', flush=True)
    torch.manual_seed(0); m = ViLSeg(TrainConfig.from_recipe('demo').model_config())
m.eval()
val = VOCStyleSegmentation(a.data, 'val')
x = torch.stack([val[i]['image'] for i in range(a.images)])
names = [c for c in val.class_names[1:]]
m.class_embeddings(names, None)                                   # the text side once, outside the timings
dense = m.cfg.dense_features
settings = {
    'bare dense forward': lambda: image_features(m.clip, normalize(x), dense=dense),
    'dense, no PAMR': lambda: m.scores(x, names, method='dense', pamr_iters=0),
    'dense + PAMR': lambda: m.scores(x, names, method='dense'),
    "clusters, the paper's (no refit, no PAMR)": lambda: m.scores(x, names, method='cluster', refine=0, pamr_iters=0),
    'clusters + refit, no PAMR': lambda: m.scores(x, names, method='cluster', pamr_iters=0),
    "clusters + refit + PAMR (the demo's)": lambda: m.scores(x, names, method='cluster'),
    'clusters + refit + PAMR at half size': lambda: m.scores(x, names, method='cluster', pamr_scale=0.5),
}
times = {k: [] for k in settings}
with torch.no_grad():
    for r in range(a.repeats + 1):
        for k, f in settings.items():
            t = time.perf_counter(); f(); dt = time.perf_counter() - t
            if r: times[k].append(dt)
base = statistics.median(times['bare dense forward'])
rows = []
for k in settings:
    s = statistics.median(times[k])
    rows.append({'read-out': k, 'ms_per_image': round(1e3 * s / a.images, 2), 'ratio_to_bare_forward': round(s / base, 2)})
    print(json.dumps(rows[-1]), flush=True)
print(f'\n| {a.images} world val images, {a.threads} threads | ms / image | ratio to the bare forward |\n|---|---|---|')
for r in rows: print(f"| {r['read-out']} | {r['ms_per_image']} | {r['ratio_to_bare_forward']} |")

# a real-size image through the coco_object preset's path
coco = [n for n in read_class_names(class_names_file('coco_object'))][1:]
tmpl = get_templates('imagenet80')
t = time.perf_counter(); m.class_embeddings(coco, tmpl); t_text = time.perf_counter() - t
img = torch.randint(0, 256, (1, 3, 480, 640), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
real = {}
for label, kw in (("the demo's read-out", {}), ('PAMR at a quarter of the window (TCL)', {'pamr_scale': 0.25}), ('no PAMR', {'pamr_iters': 0})):
    ts = []
    with torch.no_grad():
        for r in range(a.real_repeats + 1):
            t = time.perf_counter()
            xr = _resize_short(img, 448)
            slide_scores(m, xr, coco, 448, 224, method='cluster', bg_index=None, templates=tmpl, **kw)
            if r: ts.append(time.perf_counter() - t)
    real[label] = statistics.median(ts)
    print(json.dumps({'real-size image': label, 'seconds': round(real[label], 2), 'images_per_s': round(1 / real[label], 3)}), flush=True)
print(f'\n| 640x480, coco_object path ({len(coco)} classes, 2 windows of 448) | s / image | images/s |\n|---|---|---|')
for k, s in real.items(): print(f'| {k} | {s:.2f} | {1 / s:.2f} |')
print(f'(class embeddings of {len(coco)} classes x {len(tmpl)} templates, once: {t_text:.1f} s)')
