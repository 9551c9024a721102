#!/usr/bin/env python
"""Build the COCO-Object benchmark labels (80 COCO thing classes + background).

Default (the benchmark GroupViT, TCL and SCLIP evaluate; GroupViT's convert_dataset/convert_coco_object.py):
Reads   MAPS = stuffthingmaps_trainval2017/SPLIT/*.png (COCO-Stuff; value = COCO id - 1, 255 = unlabeled)
Writes  OUT/annotations/SPLIT/{stem}_instanceTrainIds.png: thing value -> its rank + 1 among the 80 thing ids
        (1..80, in order of category id), every stuff value and unlabeled -> 0 (background); no ignored pixel.
        `vilseg.prep.coco_object_from_stuffthingmaps` (nbs/15_prep.ipynb).
Alternative (--from instances: labels from the instance annotations, crowd regions 255 = ignored, the smaller
of overlapping instances on top; `vilseg.segdata.coco_instances_to_labels`, nbs/02_segdata.ipynb):
Reads   COCO_ROOT/annotations/instances_SPLIT.json and the images in COCO_ROOT/SPLIT/ or COCO_ROOT/images/SPLIT/
Both link OUT/images/SPLIT to the images (--images, or COCO_ROOT) when not there already, so that
`vilseg.segdata.CocoObject(OUT, SPLIT)` reads the result.
"""
import argparse, json, os, sys
from pathlib import Path


def _link_images(img_dir, out, split):
    link = out / 'images' / split
    if link.exists() or img_dir is None: return
    link.parent.mkdir(parents=True, exist_ok=True)
    try: os.symlink(img_dir.resolve(), link, target_is_directory=True)
    except OSError as e: print(f'warning: could not link {link} -> {img_dir} ({e}); copy or move the images there', file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--from', dest='source', choices=['stuffthingmaps', 'instances'], default='stuffthingmaps',
                   help="stuffthingmaps (GroupViT's benchmark, default) or instances (the instance-based alternative)")
    p.add_argument('--maps', type=Path, default=None, help='stuffthingmaps folder of the split (with --from stuffthingmaps)')
    p.add_argument('--images', type=Path, default=None, help='COCO images of the split (linked into OUT/images/SPLIT)')
    p.add_argument('--coco-root', type=Path, default=None,
                   help='COCO 2017 folder: annotations/instances_SPLIT.json and SPLIT/ (or images/SPLIT/) with the images')
    p.add_argument('--split', default='val2017', help='COCO split (default: val2017)')
    p.add_argument('--out', type=Path, default=None, help='output root (default: --coco-root)')
    p.add_argument('--skip-existing', action='store_true', help='keep label files that already exist (resume)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from vilseg.core import VilsegDataError
    from vilseg.segdata import coco_instances_to_labels
    from vilseg.prep import coco_object_from_stuffthingmaps

    out = args.out or args.coco_root
    if out is None: p.error('--out is needed (or --coco-root)')
    if args.source == 'stuffthingmaps':
        if args.maps is None: p.error('--from stuffthingmaps needs --maps')
        try:
            st = coco_object_from_stuffthingmaps(args.maps, out / 'annotations' / args.split, progress=not args.quiet,
                                                 skip_existing=args.skip_existing)
        except VilsegDataError as e:
            print(f'error: {e}', file=sys.stderr); return 1
        _link_images(args.images, out, args.split)
        print(json.dumps(dict(source='stuffthingmaps', **st)))
        return 0
    root = args.coco_root
    if root is None: p.error('--from instances needs --coco-root')
    js = root / 'annotations' / f'instances_{args.split}.json'
    img_dir = next((d for d in (root / 'images' / args.split, root / args.split) if d.is_dir()), None)
    if img_dir is None:
        print(f'error: no image folder {root / "images" / args.split} or {root / args.split}', file=sys.stderr)
        return 2
    try:
        stats = coco_instances_to_labels(js, img_dir, out / 'annotations' / args.split, progress=not args.quiet,
                                         skip_existing=args.skip_existing)
    except VilsegDataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    _link_images(img_dir, out, args.split)
    print(json.dumps(dict(source='instances', **stats)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
