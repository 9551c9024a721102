"""World generation speed: images/s for 64 and 96 px, 1 and 2 processes (written to a temporary folder)."""
import argparse, json, shutil, tempfile, time
from pathlib import Path
from vilseg.world import make_world, WorldConfig, render_sample

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument('--n', type=int, default=2000, help='images per measurement')
a = ap.parse_args()
rows = []
for size in (64, 96):
    cfg = WorldConfig(image_size=size)
    t = time.time()
    for i in range(200): render_sample(cfg, i)
    rows.append({'what': 'render only', 'size': size, 'workers': 1, 'images_per_s': round(200 / (time.time() - t), 1)})
    for workers in (1, 2):
        d = Path(tempfile.mkdtemp())
        t = time.time(); make_world(d / 'w', n_train=a.n, n_val=0, cfg=cfg, shard_size=max(1, a.n // 4), workers=workers, progress=False)
        rows.append({'what': 'make_world (render + JPEG/PNG + shards)', 'size': size, 'workers': workers,
                     'images_per_s': round(a.n / (time.time() - t), 1)})
        shutil.rmtree(d)
for r in rows: print(json.dumps(r))
