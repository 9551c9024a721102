#!/usr/bin/env python
"""Check PASCAL VOC 2012 for the voc21 / voc20 presets, and optionally add the SBD "aug" training labels.

Reads   VOC_ROOT = VOCdevkit/VOC2012 (from VOCtrainval_11-May-2012.tar): JPEGImages/, SegmentationClass/,
        ImageSets/Segmentation/{train,val}.txt. VOC is read in place: no conversion is needed to evaluate.
With --sbd SBD_ROOT (benchmark_RELEASE from SBD, Hariharan et al. 2011):
Writes  VOC_ROOT/SegmentationClassAug/{id}.png and, named as mmsegmentation's voc_aug.py names them,
        VOC_ROOT/ImageSets/Segmentation/trainaug.txt (10 582 ids on the full data: SBD train+val and VOC train,
        minus VOC val) and aug.txt (9 118 ids: SBD train+val minus VOC train and val).
Then    vilseg eval --preset voc21 --data VOC_ROOT --model ViT-B-16-quickgelu --pretrained openai --protocol sclip --dense sclip
The conversion is `vilseg.prep.check_voc` / `vilseg.prep.sbd_to_voc` (nbs/15_prep.ipynb).
"""
import argparse, json, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--voc-root', type=Path, required=True, help='VOCdevkit/VOC2012')
    p.add_argument('--sbd', type=Path, default=None, help='SBD benchmark_RELEASE folder (optional: builds the aug set)')
    p.add_argument('--skip-existing', action='store_true', help='keep label files that already exist (resume)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from vilseg.core import VilsegDataError
    from vilseg.prep import check_voc, sbd_to_voc
    try:
        out = {'val': check_voc(a.voc_root, 'val')}
        if a.sbd: out['aug'] = sbd_to_voc(a.sbd, a.voc_root, progress=not a.quiet, skip_existing=a.skip_existing)
    except VilsegDataError as e:
        print(f'error: {e}', file=sys.stderr); return 1
    print(json.dumps(out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
