#!/usr/bin/env python
"""Generate the embedded synthetic image-caption world (captions TSV + webdataset shards + VOC-style dense labels).

The same command as `vilseg world`: every field of `vilseg.world.WorldConfig` is an option, and the settings
are recorded in the world's world.json.

Example: python data_prep/make_world.py --out data/world --n-train 20000 --n-val 500 --figure runs/world.png
         python data_prep/make_world.py --out data/world_plain --p-plain 1 --clutter 0   # a visually easier variant
"""
import sys
from vilseg.cli import main

if __name__ == '__main__':
    if any(a in ('-h', '--help') for a in sys.argv[1:]): print(__doc__)
    main(['world', *sys.argv[1:]])
