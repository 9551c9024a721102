"""How many clusters should the head have? Refit the clustering head of a trained checkpoint for several K on
its frozen encoder, then evaluate the ViL-Seg (cluster) read-out on the world's val split.

With `cluster_detach=True` (the demo's setting) IIC trains the head only, so a head fitted on the frozen
final encoder is what online training would give with an encoder that stopped moving; the comparison between
K values is fair because every K sees the same paired views, steps and optimiser (`vilseg.train.refit_head`, the
function behind `train(head_refit=...)`: features from the encoder in eval mode, i.e. BatchNorm running
statistics, where online training uses the batch's). Prints one JSON line
per K (val mIoU, calibrated background threshold, seconds), then the dense read-out and the checkpoint's own
head for reference.

    python bench/cluster_k.py --checkpoint runs/long/checkpoint.pt --data data/world --k 16,32,64,128
"""
import argparse, json, time
from dataclasses import replace
import torch
from vilseg.cli import load_model
from vilseg.evaluate import evaluate, calibrate_threshold
from vilseg.segdata import VOCStyleSegmentation
from vilseg.train import TrainConfig, world_datasets, refit_head
from vilseg.vilseg import ViLSeg

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--checkpoint', required=True)
ap.add_argument('--data', default='data/world')
ap.add_argument('--k', default='16,32,64,128', help='comma-separated cluster counts')
ap.add_argument('--steps', type=int, default=300, help='head steps per K (batches of 64 paired views)')
ap.add_argument('--eval-images', type=int, default=300)
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)

base, cfgd = load_model(a.checkpoint)
cfg = TrainConfig(**{k: v for k, v in cfgd.items() if k in TrainConfig.__dataclass_fields__})
train_ds, _, _ = world_datasets(a.data, replace(cfg.view_config(), pair=True), cfg.captions)   # paired views also for a head-less run
val, calib = VOCStyleSegmentation(a.data, 'val'), VOCStyleSegmentation(a.data, 'train')
def score(m):
    th, _ = calibrate_threshold(m, calib, method='cluster', max_images=150, progress=False)
    return float(evaluate(m, val, method='cluster', bg_threshold=th, max_images=a.eval_images, progress=False)['miou']), th

for K in [int(k) for k in a.k.split(',')]:
    t = time.time(); torch.manual_seed(0)
    m = ViLSeg(replace(base.cfg, n_clusters=K, lambda_cluster=1.0, pretrained=None))   # a trainable head even for a head-less run
    m.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith('head.')}, strict=False); m.eval()
    loss = refit_head(m, train_ds, a.steps, lr=1e-3, batch_size=64, seed=1, progress=False)[-1]   # what train(head_refit=...) does
    miou, th = score(m)
    print(json.dumps({'K': K, 'val_miou': round(miou, 4), 'bg_threshold': th, 'iic_loss': round(loss, 3),
                      'seconds': round(time.time() - t)}), flush=True)
th, _ = calibrate_threshold(base, calib, method='dense', max_images=150, progress=False)
print(json.dumps({'dense read-out': round(float(evaluate(base, val, method='dense', bg_threshold=th, max_images=a.eval_images, progress=False)['miou']), 4)}))
print(json.dumps({'checkpoint head (K=%d)' % base.cfg.n_clusters: round(score(base)[0], 4)}))
