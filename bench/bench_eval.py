"""Evaluation speed and memory: one 500x375 image (VOC's typical size) through a preset's full protocol
(short side 448 -> 597x448, sliding window 448 / stride 224 -> 2 crops, 21 classes x 80 templates), for a
tiny vilseg model and for open_clip ViT-B-16 (random weights: the cost does not depend on the values).

Reports, per model: text-embedding time (once per class list, cached), seconds per image and images/s over
`--images` images, and the peak RSS of the process after each model (ru_maxrss: weights + activations).
Run each model in its own process (`--model`) to get its own peak memory."""
import argparse, json, resource, time
import numpy as np
import torch
from vilseg.protocols import get_protocol, get_templates, clip_baseline
from vilseg.segdata import VOC21
from vilseg.evaluate import evaluate

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument('--model', default='vilseg-tiny', help='open_clip model name or a vilseg tiny config')
ap.add_argument('--images', type=int, default=3)
ap.add_argument('--preset', default='voc21')
ap.add_argument('--dense', default='value', choices=['tokens', 'value'])
ap.add_argument('--threads', type=int, default=torch.get_num_threads())
ap.add_argument('--device', default='cpu', help="'cuda' on a GPU machine (then the peak GPU memory too)")
a = ap.parse_args()
torch.set_num_threads(a.threads)


class OneImage(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0); self.n = n
        self.img = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=g)
        self.lab = torch.randint(0, 21, (375, 500), generator=g)
    def __len__(self): return self.n
    def __getitem__(self, i): return dict(image=self.img, label=self.lab, name=str(i))


rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.manual_seed(0)
m = clip_baseline(a.model, device=a.device)
rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
p = get_protocol(a.preset)
t = time.perf_counter(); m.class_embeddings(VOC21[1:], get_templates(p.templates)); t_text = time.perf_counter() - t
r = evaluate(m, OneImage(a.images), class_names=VOC21, method='dense', bg_index=0, bg_threshold=p.bg_threshold,
             batch_size=1, templates=get_templates(p.templates), window=p.window, stride=p.stride, short_side=p.short_side,
             bg_score=p.bg_score, prob_scale=p.prob_scale, dense=a.dense, progress=False, device=a.device)
print(json.dumps({'model': a.model, 'preset': a.preset, 'image': '500x375', 'threads': a.threads, 'dense': a.dense,
                  'params_m': round(sum(x.numel() for x in m.clip.parameters()) / 1e6, 1),
                  'text_embedding_s': round(t_text, 2), 's_per_image': round(r['seconds'] / r['n_images'], 3),
                  'images_per_s': round(r['images_per_second'], 3), 'rss_after_model_mb': round(rss_model),
                  'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  **({'device': torch.cuda.get_device_name(), 'peak_gpu_mb': round(torch.cuda.max_memory_allocated() / 2 ** 20)}
                     if a.device.startswith('cuda') else {})}))
