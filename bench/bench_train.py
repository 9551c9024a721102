"""Training-step speed and memory on synthetic batches (no data loading): s/step (median after a warm-up step), images/s,
FLOPs per step (`torch.utils.flop_counter`) and the model FLOP utilisation against a large matmul in the same process,
and the process's peak RSS (weights, optimiser state, activations; `ru_maxrss`, so it only grows from one setting to the next).

    .venv/bin/python bench/bench_train.py                                         # vilseg-tiny, 64 px, batch 64: 4 settings
    .venv/bin/python bench/bench_train.py --model ViT-B-16 --image-size 224 --batch-size 16 --steps 3   # cross-modal only
    .venv/bin/python bench/bench_train.py --model ViT-B-16 --image-size 224 --batch-size 16 --steps 3 --settings full

Run each model in its own process to get its own peak memory."""
import argparse, json, resource, time
import torch
from vilseg.vilseg import ViLSeg, ViLSegConfig
from vilseg.train import make_optimizer
from common import matmul_peak

SETTINGS = {'cross': ('cross only', dict(lambda_vision=0, lambda_cluster=0)),
            'vision': ('cross + vision (2 local crops)', dict(lambda_cluster=0)),
            'detached': ('full ViL-Seg (detached pair)', dict(cluster_detach=True)),
            'full': ('full ViL-Seg (pair with gradient)', dict(cluster_detach=False))}
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--model', default='vilseg-tiny')
ap.add_argument('--image-size', type=int, default=64, help='the global and paired views (local crops: half of it)')
ap.add_argument('--batch-size', type=int, default=64)
ap.add_argument('--steps', type=int, default=5)
ap.add_argument('--settings', nargs='+', choices=list(SETTINGS), default=None,
                help='default: all four for vilseg-tiny, cross-modal only for other models')
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
ap.add_argument('--device', default='cpu', help="'cuda': bf16 autocast, MFU against a bf16 matmul, peak GPU memory")
a = ap.parse_args()
torch.set_num_threads(a.threads)
B, S = a.batch_size, a.image_size
from torch.utils.flop_counter import FlopCounterMode
import contextlib
dev = torch.device(a.device); cuda = dev.type == 'cuda'
sync = torch.cuda.synchronize if cuda else (lambda: None)
amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
peak = matmul_peak(dev)                                     # the practical peak: a large matmul (fp32 on the CPU, bf16 on CUDA)
for key in a.settings or (list(SETTINGS) if a.model.startswith('vilseg-') else ['cross']):
    name, kw = SETTINGS[key]
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model=a.model, cluster_warmup=0, **kw)).to(dev); opt = make_optimizer(m, 3e-4, 0.05)
    b = {'global': torch.randn(B, 3, S, S), 'tokens': m.tokenizer(['a red star and a blue ring next to a tree'] * B)}
    if m.cfg.lambda_vision: b['local'] = torch.randn(B, 2, 3, S // 2, S // 2)
    if m.cfg.lambda_cluster: b.update(pair=torch.randn(B, 3, S, S), pair_box=torch.tensor([[.1, .1, .8, .9]] * B), pair_flip=torch.zeros(B, dtype=torch.bool))
    b = {k: v.to(dev) for k, v in b.items()}
    def step():
        with amp(): o = m(b, step=10)
        opt.zero_grad(); o['loss'].backward(); opt.step(); sync()
    with FlopCounterMode(display=False) as fc: step()                # forward + backward FLOPs (and a warm-up step)
    ts = []
    for _ in range(a.steps):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    s = sorted(ts)[len(ts) // 2]
    print(json.dumps({'model': a.model, 'image_size': S, 'setting': name, 'batch': B, 'threads': a.threads, 's_per_step': round(s, 3),
                      'images_per_s': round(B / s, 1), 'gflop_per_step': round(fc.get_total_flops() / 1e9, 1),
                      'mfu': round(fc.get_total_flops() / s / peak, 3), 'matmul_peak_gflop_s': round(peak / 1e9, 1), 'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      **({'peak_gpu_mb': round(torch.cuda.max_memory_allocated() / 2 ** 20)} if cuda else {})}), flush=True)
