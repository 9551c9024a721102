#!/usr/bin/env python
"""Check (and optionally unpack) ADE20K / ADEChallengeData2016 for the ade150 preset.

Reads   ADEChallengeData2016.zip (--zip, unpacked into --out) or an unpacked ADEChallengeData2016 folder (--root):
        images/{training,validation}/*.jpg, annotations/{training,validation}/*.png (0 = other, 1..150).
        The folder is read in place; this checks that images and labels pair up and that label values are valid.
Then    vilseg eval --preset ade150 --data ROOT ...
The check is `vilseg.prep.check_ade20k` (nbs/15_prep.ipynb).
"""
import argparse, json, sys, zipfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--root', type=Path, help='an unpacked ADEChallengeData2016 folder')
    g.add_argument('--zip', type=Path, help='ADEChallengeData2016.zip to unpack into --out')
    p.add_argument('--out', type=Path, default=Path('data'), help='where --zip is unpacked (default: data/)')
    p.add_argument('--split', default='validation')
    p.add_argument('--check-all', action='store_true', help='check every label map (default: 50 spread over the split)')
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vilseg.core import VilsegDataError
    from vilseg.prep import check_ade20k
    root = a.root
    if a.zip:
        if not a.zip.is_file(): print(f'error: {a.zip}: not found', file=sys.stderr); return 2
        with zipfile.ZipFile(a.zip) as z:
            bad = [n for n in z.namelist() if n.startswith('/') or '..' in Path(n).parts]
            if bad: print(f'error: {a.zip}: unsafe member {bad[0]!r}', file=sys.stderr); return 1
            z.extractall(a.out)
        root = a.out / 'ADEChallengeData2016'
    try:
        st = check_ade20k(root, a.split, max_check=None if a.check_all else 50)
    except VilsegDataError as e:
        print(f'error: {e}', file=sys.stderr); return 1
    print(json.dumps(dict(st, root=str(root))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
