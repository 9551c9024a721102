"""Does the data pipeline keep up with the training step? Side by side in one process, on the demo recipe:

1. the loader alone (decode + geometric views + collate) with 0, 1 and 2 workers, in images/s;
2. the model step alone (the batch's colour jitter, forward, backward, optimiser) on a prefetched batch: the rate
   the loader has to sustain;
3. real training (`vilseg.train.train`, the demo recipe, `--steps` steps) with 0 and 1 loader workers: its images/s
   (median over its 10-step log intervals after the first), the fraction of its time spent waiting for the loader,
   and its rate as a fraction of the step alone.

    .venv/bin/python bench/bench_data.py                    # data/world, batch 64, 60 training steps per setting
    .venv/bin/python bench/bench_data.py --steps 100 --workers 0 1 2"""
import argparse, json, statistics, tempfile, time
from dataclasses import replace
import torch
from torch.utils.data import DataLoader

from vilseg.train import TrainConfig, make_optimizer, world_datasets, train, SeededSamples, ResumableBatchSampler
from vilseg.captions import collate_captions
from vilseg.losses import build_noun_vocab
from vilseg.views import MultiView
from vilseg.vilseg import ViLSeg

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--data', default='data/world')
ap.add_argument('--batch-size', type=int, default=64)
ap.add_argument('--batches', type=int, default=20, help='batches timed per loader setting')
ap.add_argument('--repeats', type=int, default=7, help='timed model steps (after a warm-up step)')
ap.add_argument('--steps', type=int, default=60, help='training steps per real-training setting')
ap.add_argument('--workers', type=int, nargs='+', default=[0, 1])
a = ap.parse_args()

cfg = replace(TrainConfig.from_recipe('demo'), data=a.data, batch_size=a.batch_size)
ds = world_datasets(cfg.data, cfg.view_config(), cfg.captions)[0]
views = MultiView(cfg.view_config())
rows = []

def loader(workers):
    return DataLoader(SeededSamples(ds), batch_sampler=ResumableBatchSampler(len(ds), a.batch_size, seed=0), num_workers=workers,
                      collate_fn=collate_captions, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

for w in (0, 1, 2):                                         # 1. the loader alone
    it = iter(loader(w)); next(it)
    t = time.perf_counter()
    for _ in range(a.batches): next(it)
    rows.append({'what': f'loader alone, {w} workers', 'images_per_s': round(a.batches * a.batch_size / (time.perf_counter() - t), 1)})
    print(json.dumps(rows[-1]), flush=True)
    del it

torch.manual_seed(0)                                        # 2. the model step alone
m = ViLSeg(cfg.model_config()).train()
caps = [c for _, _, cs in ds.items for c in (cs if isinstance(cs, (list, tuple)) else [cs])]
m.set_noun_vocab(build_noun_vocab(caps, min_count=cfg.noun_min_count, parse=cfg.noun_parse))
opt = make_optimizer(m, cfg.lr, cfg.weight_decay)
b = next(iter(loader(0))); b.pop('n_skipped', None); b.update(b.pop('image'))
t = time.perf_counter(); views.finish(dict(b)); finish_s = time.perf_counter() - t
ts = []
for r in range(a.repeats + 1):
    t = time.perf_counter()
    bb = views.finish(dict(b)); o = m(bb, step=500); opt.zero_grad(set_to_none=True); o['loss'].backward(); opt.step()
    if r: ts.append(time.perf_counter() - t)
step_rate = a.batch_size / statistics.median(ts)
rows.append({'what': 'model step alone', 'images_per_s': round(step_rate, 1), 'colour_jitter_ms_per_batch': round(1e3 * finish_s, 1)})
print(json.dumps(rows[-1]), flush=True)
del m, opt

for w in a.workers:                                         # 3. real training
    with tempfile.TemporaryDirectory() as d:
        r = train(replace(cfg, steps=a.steps, warmup=5, out_dir=f'{d}/run', num_workers=w, progress=False, log_every=10,
                          eval_images=4, calib_images=4))
        recs = [json.loads(l) for l in open(f'{d}/run/metrics.jsonl') if '"images_per_s"' in l][1:]   # steady state: not the first 10 steps
    rate, wait = statistics.median(x['images_per_s'] for x in recs), statistics.median(x['loader_wait'] for x in recs)
    rows.append({'what': f'training, {w} loader workers', 'images_per_s': round(rate, 1), 'loader_wait_fraction': round(wait, 4),
                 'of_step_alone': round(rate / step_rate, 3), 'whole_run_images_per_s': r['images_per_s']})
    print(json.dumps(rows[-1]), flush=True)

print(f'\n| {cfg.batch_size} images per batch, {torch.get_num_threads()} threads | images/s | waiting for the loader | of the step alone |\n|---|---|---|---|')
for r in rows:
    wait = f"{100 * r['loader_wait_fraction']:.1f} %" if 'loader_wait_fraction' in r else ''
    frac = f"{100 * r['of_step_alone']:.0f} %" if 'of_step_alone' in r else ''
    print(f"| {r['what']} | {r['images_per_s']} | {wait} | {frac} |")
