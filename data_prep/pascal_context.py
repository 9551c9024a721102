#!/usr/bin/env python
"""Build PASCAL Context 59/60 labels (context59 / context60 presets) from the official annotation files.

Reads   VOC2010 = VOCdevkit/VOC2010 (VOCtrainval_03-May-2010.tar): JPEGImages/ and ImageSets/Main/{train,val}.txt;
        ANNOTATIONS = the trainval/ folder of the official trainval.tar.gz (one {id}.mat per image, key LabelMap,
        459-class indices) and LABELS = its labels.txt ("k: name" lines).
Writes  OUT/SegmentationClassContext/{id}.png (0 = background, 1..59 = the 59 classes in mmsegmentation's order),
        OUT/ImageSets/SegmentationContext/{train,val}.txt, and links OUT/JPEGImages to the VOC2010 images.
        With --detail-json trainval_merged.json (the Detail API's file, as mmsegmentation's converter reads it) the
        split lists are mmseg's (4 996 train / 5 104 val); without it, VOC 2010's ImageSets/Main lists (5 105 val).
        Listed images without a .mat file are left out and named ("dropped" in the printed JSON).
Then    vilseg eval --preset context60 --data OUT ...   (context59 ignores the background pixels)
The conversion is `vilseg.prep.context_to_voc_layout` (nbs/15_prep.ipynb): classes are matched by name.
"""
import argparse, json, sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--voc2010', type=Path, required=True, help='VOCdevkit/VOC2010')
    p.add_argument('--annotations', type=Path, required=True, help='folder of the official {id}.mat files')
    p.add_argument('--labels', type=Path, default=None, help='labels.txt (default: next to --annotations)')
    p.add_argument('--out', type=Path, required=True, help='output root (e.g. data/pascal_context)')
    p.add_argument('--splits', nargs='+', default=['train', 'val'])
    p.add_argument('--detail-json', type=Path, default=None, help="the Detail API's trainval_merged.json: mmseg's split lists")
    p.add_argument('--skip-existing', action='store_true', help='keep label files that already exist (resume)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vilseg.core import VilsegDataError
    from vilseg.prep import context_to_voc_layout
    labels = a.labels or a.annotations.parent / 'labels.txt'
    try:
        st = context_to_voc_layout(a.voc2010, a.annotations, labels, a.out, splits=a.splits,
                                   progress=not a.quiet, skip_existing=a.skip_existing, detail_json=a.detail_json)
    except VilsegDataError as e:
        print(f'error: {e}', file=sys.stderr); return 1
    dropped = st.pop('dropped')
    print(json.dumps({'images': st, 'dropped': dropped, 'out': str(a.out)}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
