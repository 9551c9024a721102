"""Training steps side by side in one process, as ratios: the demo recipe's step and the paper's recipe's step against a
plain CLIP step (the cross-modal loss only) on the same model, batch and image size; and each step's achieved FLOP/s
against the FLOP/s of a large matmul in the same process (the machine's practical peak), i.e. model FLOP utilisation.

Real batches of the embedded world (its captions, the views each recipe uses); FLOPs counted by
`torch.utils.flop_counter.FlopCounterMode` (forward + backward); timings are medians over `--repeats` rounds in which
the three steps alternate, after a warm-up round.

    .venv/bin/python bench/bench_ratios.py                 # vilseg-tiny, batch 64, data/world
    .venv/bin/python bench/bench_ratios.py --batch-size 32 --repeats 9"""
import argparse, json, statistics, time
from dataclasses import replace
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from vilseg.train import TrainConfig, make_optimizer, world_datasets
from vilseg.captions import collate_captions
from vilseg.losses import build_noun_vocab
from vilseg.vilseg import ViLSeg
from vilseg.views import MultiView
from common import matmul_peak

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--data', default='data/world')
ap.add_argument('--batch-size', type=int, default=64)
ap.add_argument('--repeats', type=int, default=7)
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads)

recipes = {'plain CLIP (cross-modal only)': TrainConfig.from_recipe('paper', lambda_vision=0.0, lambda_cluster=0.0, n_local=0),
           'demo recipe': TrainConfig.from_recipe('demo'),
           "paper's full recipe": TrainConfig.from_recipe('paper')}
setups = {}
for name, cfg in recipes.items():
    cfg = replace(cfg, data=a.data, batch_size=a.batch_size)
    torch.manual_seed(0)
    m = ViLSeg(cfg.model_config()).train()
    ds = world_datasets(cfg.data, cfg.view_config(), cfg.captions)[0]
    if cfg.lambda_nouns > 0:
        caps = [c for _, _, cs in ds.items[:20000] for c in (cs if isinstance(cs, (list, tuple)) else [cs])]
        m.set_noun_vocab(build_noun_vocab(caps, min_count=cfg.noun_min_count, parse=cfg.noun_parse))
    opt = make_optimizer(m, cfg.lr, cfg.weight_decay)
    b = next(iter(DataLoader(ds, batch_size=a.batch_size, shuffle=True, collate_fn=collate_captions, generator=torch.Generator().manual_seed(0))))
    b.pop('n_skipped', None); b.update(b.pop('image'))
    setups[name] = (m, opt, b, MultiView(cfg.view_config()))

def step(m, opt, b, views):
    b = views.finish(dict(b))                               # the colour jitter of the uint8 views is part of the step, as in training
    o = m(b, step=500); opt.zero_grad(set_to_none=True); o['loss'].backward(); opt.step()

flops = {}
for name, (m, opt, b, views) in setups.items():
    with FlopCounterMode(display=False) as fc: step(m, opt, b, views)
    flops[name] = fc.get_total_flops()

n = 2048
peak = matmul_peak('cpu', n)                                # the practical peak: a large fp32 matmul, same process and threads

times = {k: [] for k in setups}
for r in range(a.repeats + 1):                              # round 0 warms up
    for name, (m, opt, b, views) in setups.items():
        t = time.perf_counter(); step(m, opt, b, views); dt = time.perf_counter() - t
        if r: times[name].append(dt)

base = statistics.median(times['plain CLIP (cross-modal only)'])
rows = []
for name in setups:
    s = statistics.median(times[name])
    rows.append({'step': name, 'batch': a.batch_size, 'threads': a.threads, 's_per_step': round(s, 4), 'images_per_s': round(a.batch_size / s, 1),
                 'ratio_to_plain_clip': round(s / base, 2), 'gflop_per_step': round(flops[name] / 1e9, 1),
                 'achieved_gflop_s': round(flops[name] / s / 1e9, 1), 'matmul_peak_gflop_s': round(peak / 1e9, 1),
                 'mfu': round(flops[name] / s / peak, 3)})
    print(json.dumps(rows[-1]), flush=True)
print('\n| step | s/step | images/s | ratio to plain CLIP | GFLOP/step | achieved GFLOP/s | MFU |\n|---|---|---|---|---|---|---|')
for r in rows:
    print(f"| {r['step']} | {r['s_per_step']} | {r['images_per_s']} | {r['ratio_to_plain_clip']} | {r['gflop_per_step']} | {r['achieved_gflop_s']} | {100 * r['mfu']:.0f} % |")
print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({n}x{n} fp32, {a.threads} threads)")
