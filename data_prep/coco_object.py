#!/usr/bin/env python
"""Build the COCO-Object benchmark labels (80 COCO thing classes + background) from COCO instance annotations.

Reads   COCO_ROOT/annotations/instances_SPLIT.json and the images in COCO_ROOT/SPLIT/ or COCO_ROOT/images/SPLIT/
Writes  OUT/annotations/SPLIT/{image stem}_instanceTrainIds.png   (0 = background, 1..80 = COCO categories in
        order of category id, 255 = crowd / ignore; overlapping instances: the smaller one wins)
and links OUT/images/SPLIT to the images when they are not there already, so that
`vilseg.segdata.CocoObject(OUT, SPLIT)` reads the result. The conversion is
`vilseg.segdata.coco_instances_to_labels` (see nbs/02_segdata.ipynb).
"""
import argparse, os, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--coco-root', type=Path, required=True,
                   help='COCO 2017 folder: annotations/instances_SPLIT.json and SPLIT/ (or images/SPLIT/) with the images')
    p.add_argument('--split', default='val2017', help='COCO split (default: val2017)')
    p.add_argument('--out', type=Path, default=None, help='output root (default: --coco-root)')
    p.add_argument('--skip-existing', action='store_true', help='keep label files that already exist (resume)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from vilseg.core import VilsegDataError
    from vilseg.segdata import coco_instances_to_labels

    root, out = args.coco_root, args.out or args.coco_root
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
    link = out / 'images' / args.split
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        try: os.symlink(img_dir.resolve(), link, target_is_directory=True)
        except OSError as e:
            print(f'warning: could not link {link} -> {img_dir} ({e}); copy or move the images there', file=sys.stderr)
    print(f'{stats["written"]} label maps written, {stats["skipped"]} kept, {stats["images"]} images, '
          f'{stats["instances"]} instances, {stats["crowd"]} crowd regions, '
          f'{stats["empty_segmentations"]} empty segmentations skipped -> {out / "annotations" / args.split}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
