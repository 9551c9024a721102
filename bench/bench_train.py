"""Training-step speed and memory of the tiny configs on synthetic batches (no data loading): s/step, images/s, peak RSS."""
import argparse, json, resource, time
import torch
from vilseg.vilseg import ViLSeg, ViLSegConfig
from vilseg.train import make_optimizer

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument('--batch-size', type=int, default=64)
ap.add_argument('--steps', type=int, default=5)
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads)
B = a.batch_size
for name, kw in [('cross only', dict(lambda_vision=0, lambda_cluster=0)), ('cross + vision (2 local crops)', dict(lambda_cluster=0)),
                 ('full ViL-Seg (detached pair)', dict(cluster_detach=True)), ('full ViL-Seg (pair with gradient)', dict(cluster_detach=False))]:
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-tiny', cluster_warmup=0, **kw)); opt = make_optimizer(m, 3e-4, 0.05)
    b = {'global': torch.randn(B, 3, 64, 64), 'tokens': m.tokenizer(['a red star and a blue ring next to a tree'] * B)}
    if m.cfg.lambda_vision: b['local'] = torch.randn(B, 2, 3, 32, 32)
    if m.cfg.lambda_cluster: b.update(pair=torch.randn(B, 3, 64, 64), pair_box=torch.tensor([[.1, .1, .8, .9]] * B), pair_flip=torch.zeros(B, dtype=torch.bool))
    ts = []
    for _ in range(a.steps):
        t = time.time(); o = m(b, step=10); opt.zero_grad(); o['loss'].backward(); opt.step(); ts.append(time.time() - t)
    s = sorted(ts[1:])[len(ts[1:]) // 2]
    print(json.dumps({'setting': name, 'batch': B, 'threads': a.threads, 's_per_step': round(s, 3), 'images_per_s': round(B / s, 1),
                      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
