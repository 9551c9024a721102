"""The embedded world is read by the same readers as real data, is deterministic by seed, and its scripts run."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vilseg.world import make_world, WorldConfig, SHAPES, SYNONYMS
from vilseg.captions import CsvCaptions, WdsCaptions, collate_captions
from vilseg.segdata import VOCStyleSegmentation, read_class_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp('w')
    make_world(d / 'w', n_train=24, n_val=6, shard_size=10, workers=1, progress=False)
    return d / 'w'


def test_world_read_by_real_data_readers(world):
    tsv = CsvCaptions(world / 'captions' / 'train.tsv')
    assert len(tsv) == 24 and tsv[0]['image'].shape == (3, 64, 64) and tsv[0]['image'].dtype == torch.uint8
    wds = [s for s in WdsCaptions(str(world / 'shards' / 'train-{000000..000002}.tar')) if s is not None]
    assert len(wds) == 24
    by_key = {s['key']: s['caption'] for s in wds}
    assert by_key['train_0000000'] == tsv[0]['caption'], 'TSV and shards carry the same caption'
    val = VOCStyleSegmentation(world, 'val')
    assert len(val) == 6 and [c[0] for c in val.class_names] == ['background'] + SHAPES
    assert read_class_names(world / 'class_names.txt')[SHAPES.index('ring') + 1] == SYNONYMS['ring']
    # the label map holds exactly the shapes of the sample's metadata (visible ones)
    import tarfile
    with tarfile.open(world / 'shards' / 'val-000000.tar') as t:
        meta = json.load(t.extractfile(f"{val[0]['name']}.json"))
    present = {SHAPES[i - 1] for i in val[0]['label'].unique().tolist() if i not in (0, 255)}
    assert present <= {o['shape'] for o in meta['objects']} and present
    splits = json.loads((world / 'splits.json').read_text())
    assert set(splits['seen']) | set(splits['unseen']) == set(SHAPES) and not set(splits['seen']) & set(splits['unseen'])
    canon = (world / 'captions' / 'train_canonical.tsv').read_text().splitlines()[1]
    assert all(w in SHAPES for w in canon.split('\t')[1].replace('a ', '').split(' and '))


def test_world_is_deterministic_by_seed(tmp_path):
    a = make_world(tmp_path / 'a', n_train=6, n_val=2, workers=1, progress=False)
    b = make_world(tmp_path / 'b', n_train=6, n_val=2, workers=2, shard_size=3, progress=False)
    c = make_world(tmp_path / 'c', n_train=6, n_val=2, cfg=WorldConfig(seed=1), workers=1, progress=False)
    for f in ('JPEGImages/train_0000005.jpg', 'SegmentationClass/val_10000001.png', 'captions/train.tsv'):
        assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes(), f'{f} depends on worker count'
    assert (tmp_path / 'a/captions/train.tsv').read_text() != (tmp_path / 'c/captions/train.tsv').read_text()


def test_world_refuses_to_write_into_foreign_folder(tmp_path):
    (tmp_path / 'x').mkdir(); (tmp_path / 'x' / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='no world.json'):
        make_world(tmp_path / 'x', n_train=2, n_val=1, workers=1, progress=False)
    assert (tmp_path / 'x' / 'keep.txt').read_text() == 'mine'


@pytest.mark.parametrize('script', sorted(p.name for p in (ROOT / 'data_prep').glob('*.py')))
def test_data_prep_scripts_have_help(script):
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / script), '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'usage' in r.stdout.lower(), r.stderr


def test_world_training_images_decoded_once_give_the_same_views(world, tmp_path):
    "world_datasets serves the training images from one decoded array: the views of each seed equal those read from the files."
    import copy, shutil
    from PIL import Image
    from vilseg.captions import collate_captions, load_image
    from vilseg.train import TrainConfig, world_datasets, SeededSamples
    w = tmp_path / 'w'; shutil.copytree(world, w)
    cfg = TrainConfig.from_recipe('demo')
    ds = world_datasets(str(w), cfg.view_config(), 'train.tsv')[0]
    assert ds.decoded is not None and ds.decoded.ok.all() and ds.decoded.path.parent == w / 'decoded'
    files = copy.copy(ds); files.decoded = None
    a, b = SeededSamples(ds), SeededSamples(files)
    ba, bb = collate_captions([a[(i, 7 * i)] for i in range(len(ds))]), collate_captions([b[(i, 7 * i)] for i in range(len(ds))])
    assert ba['image'].keys() == bb['image'].keys() and len(ba['image']) >= 3
    for k in ba['image']: assert torch.equal(ba['image'][k], bb['image'][k]), k
    assert ba['caption'] == bb['caption']
    # a second call reads the same array; a changed image makes a new one, with the new pixels
    assert world_datasets(str(w), cfg.view_config(), 'train.tsv')[0].decoded.path == ds.decoded.path
    p = ds.items[0][1]; Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p)
    again = world_datasets(str(w), cfg.view_config(), 'train.tsv')[0].decoded
    assert again.path != ds.decoded.path and torch.equal(again[0], load_image(p)) and not torch.equal(again[0], ds.decoded[0])


def test_world_in_a_read_only_folder_reads_the_files(world, monkeypatch):
    "A data folder where the decoded array cannot be written: a warning naming it, and the images read from their files."
    import vilseg.captions as C
    from vilseg.train import TrainConfig, world_datasets
    def refuse(items, folder, progress=True): raise PermissionError(13, 'Permission denied', str(folder))
    monkeypatch.setattr(C.DecodedImages, 'build', staticmethod(refuse))
    with pytest.warns(UserWarning, match=r'decoded: cannot store the decoded images \(PermissionError'):
        ds = world_datasets(str(world), TrainConfig.from_recipe('demo').view_config(), 'train.tsv')[0]
    assert ds.decoded is None and ds[0]['image']['global'].shape[-1] > 0
