#!/usr/bin/env python
"""Build COCO-Stuff 164k labels with 171 train ids (coco_stuff171 preset).

Reads   MAPS = stuffthingmaps_trainval2017/ (from stuffthingmaps_trainval2017.zip): SPLIT/*.png, values = COCO
        category id - 1, 255 = unlabeled; IMAGES = the COCO 2017 images of SPLIT.
Writes  OUT/annotations/SPLIT/{stem}_labelTrainIds.png (0..170: 80 things then 91 stuff classes; unused ids and
        unlabeled -> 255) and links OUT/images/SPLIT to the images.
Then    vilseg eval --preset coco_stuff171 --data OUT ...
The conversion is `vilseg.prep.coco_stuff_to_train_ids` (nbs/15_prep.ipynb).
"""
import argparse, json, os, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--maps', type=Path, required=True, help='stuffthingmaps_trainval2017 folder')
    p.add_argument('--images', type=Path, required=True, help='COCO images folder holding SPLIT/ (e.g. coco/images or coco)')
    p.add_argument('--out', type=Path, required=True, help='output root (e.g. data/coco_stuff164k)')
    p.add_argument('--split', default='val2017')
    p.add_argument('--skip-existing', action='store_true', help='keep label files that already exist (resume)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vilseg.core import VilsegDataError
    from vilseg.prep import coco_stuff_to_train_ids
    img_dir = a.images / a.split
    if not img_dir.is_dir():
        print(f'error: {img_dir}: COCO image folder not found', file=sys.stderr); return 2
    try:
        st = coco_stuff_to_train_ids(a.maps / a.split, a.out / 'annotations' / a.split, progress=not a.quiet,
                                     skip_existing=a.skip_existing)
    except VilsegDataError as e:
        print(f'error: {e}', file=sys.stderr); return 1
    link = a.out / 'images' / a.split
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(img_dir.resolve(), link, target_is_directory=True)
    print(json.dumps(dict(st, out=str(a.out))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
