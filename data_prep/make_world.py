#!/usr/bin/env python
"""Generate the embedded synthetic image-caption world (captions TSV + webdataset shards + VOC-style dense labels).

Example: python data_prep/make_world.py --out data/world --n-train 20000 --n-val 500 --figure runs/world.png
"""
import argparse, json
from vilseg.world import make_world, WorldConfig, show_world

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default='data/world', help='output folder (reused if it holds the same world)')
    ap.add_argument('--n-train', type=int, default=20000)
    ap.add_argument('--n-val', type=int, default=500)
    ap.add_argument('--image-size', type=int, default=64)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    ap.add_argument('--figure', default=None, help='write a grid of samples with captions and masks here')
    a = ap.parse_args()
    info = make_world(a.out, a.n_train, a.n_val, WorldConfig(image_size=a.image_size, seed=a.seed), workers=a.workers)
    if a.figure: show_world(a.out, n=16, cols=8, path=a.figure)
    print(json.dumps({k: info[k] for k in ('n_train', 'n_val', 'images_per_second', 'seconds')}))

if __name__ == '__main__':
    main()
