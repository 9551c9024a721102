"""Dense evaluation readers on tiny fixtures written in the official formats (vilseg.segdata)."""
import json, struct, subprocess, sys, zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vilseg.core import VilsegDataError
from vilseg.segdata import (ADE20K, CLASS_NAMES, COCO_OBJECT81, CocoObject, CocoStuff, PascalContext,
                            VOCSegmentation, VOCStyleSegmentation, ZERO_SHOT_SPLITS, coco_instances_to_labels,
                            load_benchmark, read_class_names, read_label, read_rgb, seen_unseen_indices,
                            write_class_names, zero_shot_split)

ROOT = Path(__file__).resolve().parents[1]
H, W = 5, 7


# ---------------------------------------------------------------- helpers writing official formats
def palette_png(path, a):
    a = np.ascontiguousarray(a, np.uint8)
    im = Image.frombytes('P', (a.shape[1], a.shape[0]), a.tobytes())
    im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    path.parent.mkdir(parents=True, exist_ok=True); im.save(path)


def gray_png(path, a):
    path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(np.asarray(a, np.uint8)).save(path)


def jpg(path, h=H, w=W, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, quality=95)


def png16(path, a):
    "A 16-bit PNG (grayscale, RGB or RGBA) written by hand: Pillow cannot write multi-channel 16-bit."
    a = np.asarray(a, np.uint16)
    if a.ndim == 2: a = a[..., None]
    h, w, c = a.shape
    raw = b''.join(b'\x00' + a[i].astype('>u2').tobytes() for i in range(h))
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


# a VOC label: background 0, a person (15) and an aeroplane (1), 255 on the outlines
VOC_LAB = np.array([[0,   0,   0,   0,   0,   0,   0],
                    [0, 255, 255, 255,   0,   0,   0],
                    [0, 255,  15, 255,   0, 255, 255],
                    [0, 255, 255, 255,   0, 255,   1],
                    [0,   0,   0,   0,   0, 255,  20]])


@pytest.fixture
def voc(tmp_path):
    r = tmp_path / 'VOC2012'
    for i, name in enumerate(['2007_000033', '2007_000042']):
        jpg(r / 'JPEGImages' / f'{name}.jpg', value=50 + i)
        palette_png(r / 'SegmentationClass' / f'{name}.png', VOC_LAB)
    (r / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    (r / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000033\n2007_000042\n\n')
    (r / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('2007_000042\n')
    return r


# ---------------------------------------------------------------- VOC
def test_voc21_as_stored(voc):
    ds = VOCSegmentation(voc)
    assert len(ds) == 2 and ds.ignore_index == 255 and ds.background and ds.num_classes == 21
    it = ds[0]
    assert it['name'] == '2007_000033' and it['image'].shape == (3, H, W) and it['image'].dtype == torch.uint8
    assert it['label'].dtype == torch.int64 and it['label'].tolist() == VOC_LAB.tolist()
    assert ds.class_names[15][0] == 'person' and ds.class_names[0] == ['background']
    assert [x['name'] for x in VOCSegmentation(voc, 'train')] == ['2007_000042']


def test_voc20_drops_background(voc):
    ds = VOCSegmentation(voc, background=False)
    exp = [[255, 255, 255, 255, 255, 255, 255],
           [255, 255, 255, 255, 255, 255, 255],
           [255, 255,  14, 255, 255, 255, 255],
           [255, 255, 255, 255, 255, 255,   0],
           [255, 255, 255, 255, 255, 255,  19]]
    assert ds[0]['label'].tolist() == exp
    assert ds.num_classes == 20 and not ds.background
    assert ds.class_names[0][0] == 'aeroplane' and ds.class_names[14][0] == 'person' and ds.class_names[19][0] == 'tv monitor'


def test_voc_out_of_range_label(voc):
    palette_png(voc / 'SegmentationClass' / '2007_000033.png', np.full((H, W), 21))
    with pytest.raises(VilsegDataError, match=r'2007_000033\.png.*21'):
        VOCSegmentation(voc)[0]


def test_voc_style_with_class_names(tmp_path, voc):
    write_class_names(voc / 'class_names.txt', [['background'], ['disc', 'circle']] + [f'c{i}' for i in range(2, 21)])
    ds = VOCStyleSegmentation(voc, 'val')
    assert ds.class_names[1] == ['disc', 'circle'] and ds.num_classes == 21
    assert ds[1]['label'].tolist() == VOC_LAB.tolist()
    ds = VOCStyleSegmentation(voc, 'val', background=False)
    assert ds.class_names[0] == ['disc', 'circle'] and ds[0]['label'][3, 6] == 0 and ds[0]['label'][0, 0] == 255
    names = tmp_path / 'other.txt'; names.write_text('bg\n' + ''.join(f'k{i}\n' for i in range(1, 21)))
    assert VOCStyleSegmentation(voc, class_names_file=names).class_names[20] == ['k20']
    # a class-name file with too few classes for the label values is caught per item
    write_class_names(voc / 'class_names.txt', ['background', 'a'])
    with pytest.raises(VilsegDataError, match='2007_000033.png'):
        VOCStyleSegmentation(voc)[0]


# ---------------------------------------------------------------- Context
@pytest.fixture
def context(tmp_path):
    r = tmp_path / 'VOCdevkit' / 'VOC2010'
    lab = np.array([[0, 0, 1, 1, 59, 59, 30]] * H); lab[4, 6] = 0
    jpg(r / 'JPEGImages' / '2008_000002.jpg')
    gray_png(r / 'SegmentationClassContext' / '2008_000002.png', lab)
    (r / 'ImageSets' / 'SegmentationContext').mkdir(parents=True)
    (r / 'ImageSets' / 'SegmentationContext' / 'val.txt').write_text('2008_000002\n')
    return r, lab


def test_context60_and_59(context):
    r, lab = context
    ds60, ds59 = PascalContext(r, num_classes=60), PascalContext(r, 'val', num_classes=59)
    assert ds60[0]['label'].tolist() == lab.tolist() and ds60.background and ds60.class_names[0] == ['background']
    exp = np.where(lab == 0, 255, lab - 1)
    assert ds59[0]['label'].tolist() == exp.tolist() and not ds59.background
    assert ds59[0]['label'][0].tolist() == [255, 255, 0, 0, 58, 58, 29]
    assert ds59.class_names[0][0] == 'aeroplane' and ds59.class_names[58][0] == 'wood'
    assert ds60.class_names[30][0] == ds59.class_names[29][0] == 'ground'
    with pytest.raises(ValueError): PascalContext(r, num_classes=150)


# ---------------------------------------------------------------- COCO-Stuff
def test_coco_stuff_label_train_ids(tmp_path):
    r = tmp_path / 'coco_stuff164k'
    lab = np.array([[0, 170, 255, 24, 96, 7, 0]] * H)
    jpg(r / 'images' / 'val2017' / '000000000139.jpg')
    gray_png(r / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png', lab)
    gray_png(r / 'annotations' / 'val2017' / '000000000139.png', np.full((H, W), 182))  # raw stuffthingmap: not read
    ds = CocoStuff(r)
    assert len(ds) == 1 and ds.num_classes == 171 and not ds.background
    it = ds[0]
    assert it['name'] == '000000000139' and it['label'].tolist() == lab.tolist()
    assert ds.class_names[0][0] == 'person' and ds.class_names[170][0] == 'wood' and ds.class_names[94][0] == 'clouds'
    # an unconverted annotation (raw COCO ids up to 182) is refused, naming the file
    gray_png(r / 'annotations' / 'val2017' / '000000000139_labelTrainIds.png', np.full((H, W), 182))
    with pytest.raises(VilsegDataError, match=r'000000000139_labelTrainIds\.png.*182'):
        ds[0]


# ---------------------------------------------------------------- ADE20K
def test_ade20k_reduce_zero_label(tmp_path):
    r = tmp_path / 'ADEChallengeData2016'
    lab = np.array([[0, 1, 2, 150, 150, 0, 13]] * H)
    jpg(r / 'images' / 'validation' / 'ADE_val_00000001.jpg')
    gray_png(r / 'annotations' / 'validation' / 'ADE_val_00000001.png', lab)
    ds = ADE20K(r)
    assert ds[0]['label'][0].tolist() == [255, 0, 1, 149, 149, 255, 12]
    assert ds[0]['label'].tolist() == np.where(lab == 0, 255, lab - 1).tolist()
    assert ds.class_names[0][0] == 'wall' and ds.class_names[12][0] == 'person' and ds.class_names[149][0] == 'flag'
    # a label without its image is reported
    gray_png(r / 'annotations' / 'validation' / 'ADE_val_00000002.png', lab)
    with pytest.raises(VilsegDataError, match='ADE_val_00000002.png'):
        ADE20K(r)


# ---------------------------------------------------------------- COCO-Object
def rle_counts(m):
    f = m.flatten(order='F'); runs, cur, n = [], 0, 0
    for v in f:
        if v != cur: runs.append(n); cur, n = v, 0
        n += 1
    return runs + [n]


@pytest.fixture
def coco(tmp_path):
    r = tmp_path / 'coco'
    jpg(r / 'val2017' / '000000000001.jpg', 6, 8)
    jpg(r / 'val2017' / '000000000002.jpg', 3, 4)
    crowd = np.zeros((6, 8), np.uint8); crowd[3:, 4:] = 1
    js = dict(
        images=[dict(id=1, file_name='000000000001.jpg', height=6, width=8),
                dict(id=2, file_name='000000000002.jpg', height=3, width=4)],
        categories=[dict(id=1, name='person'), dict(id=18, name='dog'), dict(id=90, name='toothbrush')],
        annotations=[
            # the smaller person (area 6) is listed first but drawn last: it wins the overlap with the dog
            dict(id=7, image_id=1, category_id=1, iscrowd=0, area=6.0, segmentation=[[3, 1, 6, 1, 6, 3, 3, 3]]),
            dict(id=8, image_id=1, category_id=18, iscrowd=0, area=15.0, segmentation=[[0, 0, 5, 0, 5, 3, 0, 3]]),
            # a crowd (uncompressed RLE) overlapping a toothbrush: the individual instance keeps its pixels
            dict(id=9, image_id=1, category_id=1, iscrowd=1, area=12.0,
                 segmentation=dict(counts=rle_counts(crowd), size=[6, 8])),
            dict(id=10, image_id=1, category_id=90, iscrowd=0, area=2.0, segmentation=[[6, 4, 8, 4, 8, 5, 6, 5]]),
            dict(id=11, image_id=1, category_id=18, iscrowd=0, area=0.0, segmentation=[]),
        ])
    (r / 'annotations').mkdir(parents=True)
    (r / 'annotations' / 'instances_val2017.json').write_text(json.dumps(js))
    return r


COCO_EXPECTED = [[17, 17, 17, 17, 17,   0,   0,   0],
                 [17, 17, 17,  1,  1,   1,   0,   0],
                 [17, 17, 17,  1,  1,   1,   0,   0],
                 [ 0,  0,  0,  0, 255, 255, 255, 255],
                 [ 0,  0,  0,  0, 255, 255,  80,  80],
                 [ 0,  0,  0,  0, 255, 255, 255, 255]]


def test_coco_object_conversion_and_reader(coco, tmp_path):
    out = tmp_path / 'out'
    st = coco_instances_to_labels(coco / 'annotations' / 'instances_val2017.json', coco / 'val2017',
                                  out / 'annotations' / 'val2017', progress=False)
    assert st == dict(images=2, written=2, skipped=0, instances=3, crowd=1, empty_segmentations=1)
    (out / 'images').mkdir(); (out / 'images' / 'val2017').symlink_to(coco / 'val2017')
    ds = CocoObject(out)
    assert [it['name'] for it in ds] == ['000000000001', '000000000002']
    assert ds[0]['label'].tolist() == COCO_EXPECTED
    assert ds[1]['label'].tolist() == [[0] * 4] * 3
    assert ds.background and ds.num_classes == 81
    assert [ds.class_names[k][0] for k in (0, 1, 17, 80)] == ['background', 'person', 'dog', 'toothbrush']
    assert ds.class_names == COCO_OBJECT81
    st = coco_instances_to_labels(coco / 'annotations' / 'instances_val2017.json', coco / 'val2017',
                                  out / 'annotations' / 'val2017', progress=False, skip_existing=True)
    assert st['skipped'] == 2 and st['written'] == 0


def test_coco_object_script(coco):
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'coco_object.py'), '--help'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '--coco-root' in r.stdout and '--split' in r.stdout and '--out' in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'coco_object.py'), '--from', 'instances', '--coco-root', str(coco),
                        '--split', 'val2017', '--quiet'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert CocoObject(coco, 'val2017')[0]['label'].tolist() == COCO_EXPECTED   # images/val2017 was linked
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'coco_object.py'), '--from', 'instances', '--coco-root', str(coco),
                        '--split', 'train2017'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'train2017' in r.stderr


def test_coco_object_bad_inputs(coco, tmp_path):
    js = coco / 'annotations' / 'instances_val2017.json'
    d = json.loads(js.read_text()); d['annotations'][0]['category_id'] = 12  # not a COCO category id
    bad = tmp_path / 'bad.json'; bad.write_text(json.dumps(d))
    with pytest.raises(VilsegDataError, match=r'bad\.json.*12'):
        coco_instances_to_labels(bad, coco / 'val2017', tmp_path / 'o', progress=False)
    (coco / 'val2017' / '000000000002.jpg').unlink()
    with pytest.raises(VilsegDataError, match=r'000000000002\.jpg'):
        coco_instances_to_labels(js, coco / 'val2017', tmp_path / 'o', progress=False)
    jpg(coco / 'val2017' / '000000000002.jpg', 4, 4)  # wrong size for the json
    with pytest.raises(VilsegDataError, match=r'000000000002\.jpg.*4x4.*4x3'):
        coco_instances_to_labels(js, coco / 'val2017', tmp_path / 'o', progress=False)
    (tmp_path / 'trunc.json').write_text('{"images": [')
    with pytest.raises(VilsegDataError, match=r'trunc\.json'):
        coco_instances_to_labels(tmp_path / 'trunc.json', coco / 'val2017', tmp_path / 'o', progress=False)


# ---------------------------------------------------------------- bad inputs
def test_missing_image_at_build_and_at_read(voc):
    (voc / 'JPEGImages' / '2007_000042.jpg').unlink()
    with pytest.raises(VilsegDataError, match=r'2007_000042\.jpg.*not found'):
        VOCSegmentation(voc)
    (voc / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000033\n')
    ds = VOCSegmentation(voc)
    (voc / 'JPEGImages' / '2007_000033.jpg').unlink()  # deleted after the dataset was built
    with pytest.raises(VilsegDataError, match=r'2007_000033\.jpg'):
        ds[0]
    with pytest.raises(VilsegDataError, match=r'test\.txt'):
        VOCSegmentation(voc, 'test')
    (voc / 'SegmentationClass' / '2007_000042.png').unlink()
    (voc / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000042\n')
    jpg(voc / 'JPEGImages' / '2007_000042.jpg')
    with pytest.raises(VilsegDataError, match=r'SegmentationClass/2007_000042\.png'):
        VOCSegmentation(voc)


def test_truncated_and_corrupt_jpeg(tmp_path, voc):
    p = voc / 'JPEGImages' / '2007_000033.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(p, quality=95)
    data = p.read_bytes(); p.write_bytes(data[: len(data) // 2])
    with pytest.raises(VilsegDataError, match=r'(?i)2007_000033\.jpg.*truncated'):
        VOCSegmentation(voc)[0]
    p.write_bytes(b'\xff\xd8 garbage')
    with pytest.raises(VilsegDataError, match=r'2007_000033\.jpg'):
        read_rgb(p)


def test_label_size_mismatch_names_both(voc):
    palette_png(voc / 'SegmentationClass' / '2007_000033.png', np.zeros((H + 1, W)))
    with pytest.raises(VilsegDataError) as e:
        VOCSegmentation(voc)[0]
    assert 'SegmentationClass/2007_000033.png' in str(e.value) and 'JPEGImages/2007_000033.jpg' in str(e.value)


def test_colour_label_refused(voc):
    p = voc / 'SegmentationClass' / '2007_000033.png'
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(p)
    with pytest.raises(VilsegDataError, match=r'2007_000033\.png.*RGB'):
        VOCSegmentation(voc)[0]


def test_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / 'g.png')
    x = read_rgb(tmp_path / 'g.png')
    assert x.shape == (3, H, W) and all(torch.equal(x[c], torch.from_numpy(g)) for c in range(3))

    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / 'a.png')
    assert read_rgb(tmp_path / 'a.png').permute(1, 2, 0).numpy().tolist() == rgba[..., :3].tolist()

    g16 = np.array([[0, 1, 128, 129, 257, 32767, 32768], [65535, 65534, 1000, 60000, 514, 385, 386]], np.uint16)
    png16(tmp_path / 'g16.png', g16)
    assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
    x = read_rgb(tmp_path / 'g16.png')
    assert x[0].tolist() == np.round(g16 / 257).astype(np.uint8).tolist() and torch.equal(x[0], x[1])
    assert x[0].tolist() == [[0, 0, 0, 1, 1, 127, 128], [255, 255, 4, 233, 2, 1, 2]]
    Image.fromarray(g16).save(tmp_path / 'g16b.png')  # Pillow's own 16-bit writer
    assert read_rgb(tmp_path / 'g16b.png')[0, 1, 0] == 255

    rgb16 = np.array([[[0, 65535, 32896], [25800, 1000, 60000]]], np.uint16)
    png16(tmp_path / 'c16.png', rgb16)
    x = read_rgb(tmp_path / 'c16.png').permute(1, 2, 0).numpy().astype(int)
    assert x.shape == (1, 2, 3) and np.abs(x - np.round(rgb16 / 257)).max() <= 1   # Pillow keeps the high byte

    idx = np.array([[0, 1, 2, 3, 0, 1, 2]] * H, np.uint8)
    im = Image.frombytes('P', (W, H), idx.tobytes())
    colours = [[10, 20, 30], [200, 0, 0], [0, 255, 0], [7, 7, 7]]
    im.putpalette([v for c in colours for v in c]); im.save(tmp_path / 'p.png')
    x = read_rgb(tmp_path / 'p.png').permute(1, 2, 0).numpy()
    assert x.tolist() == np.array(colours, np.uint8)[idx].tolist()
    assert read_label(tmp_path / 'p.png').tolist() == idx.tolist()

    Image.fromarray(np.array([[1, 300], [65535, 0]], np.uint16)).save(tmp_path / 'l16.png')
    assert read_label(tmp_path / 'l16.png').tolist() == [[1, 300], [65535, 0]]

    with pytest.raises(VilsegDataError, match=r'nothere\.png.*not found'):
        read_rgb(tmp_path / 'nothere.png')


# ---------------------------------------------------------------- class names and splits
def test_class_name_files(tmp_path):
    p = tmp_path / 'names.txt'
    p.write_text('# VOC with a twist\n\nbackground\n  aeroplane ,  airplane  \ntv  monitor, television # tv\n')
    assert read_class_names(p) == [['background'], ['aeroplane', 'airplane'], ['tv monitor', 'television']]
    write_class_names(tmp_path / 'rt.txt', CLASS_NAMES['coco_stuff171'])
    assert read_class_names(tmp_path / 'rt.txt') == CLASS_NAMES['coco_stuff171']
    for text, line in [('cat\n\n,\ndog\n', 'line 3'), ('cat\ndog, ,puppy\n', 'line 2'),
                       ('cat\ndog\nkitty, cat\n', 'line 3'), ('tv monitor\ntvmonitor\n', 'line 2')]:
        p.write_text(text)
        with pytest.raises(VilsegDataError, match=rf'names\.txt.*{line}'):
            read_class_names(p)
    p.write_text('# only a comment\n\n')
    with pytest.raises(VilsegDataError, match=r'names\.txt'):
        read_class_names(p)
    with pytest.raises(VilsegDataError, match=r'missing\.txt'):
        read_class_names(tmp_path / 'missing.txt')
    with pytest.raises(ValueError):
        write_class_names(tmp_path / 'x.txt', ['a,b'])


def test_zero_shot_splits():
    names, seen, unseen = zero_shot_split('voc')
    assert names == CLASS_NAMES['voc20'] and unseen == [15, 16, 17, 18, 19] and seen == list(range(15))
    names, seen, unseen = zero_shot_split('coco_stuff171')
    assert len(unseen) == 15 and len(seen) == 156 and not set(seen) & set(unseen)
    assert sorted(names[i][0] for i in unseen) == sorted(ZERO_SHOT_SPLITS['coco_stuff171']['unseen'])
    assert unseen[:2] == [19, 23]  # cow, giraffe
    # matching by a synonym and by a devkit spelling; background stays seen
    seen, unseen = seen_unseen_indices(CLASS_NAMES['voc21'], ['television', 'pottedplant', 'Sofa'])
    assert unseen == [16, 18, 20] and 0 in seen
    with pytest.raises(ValueError, match='unicorn'):
        seen_unseen_indices(CLASS_NAMES['voc20'], ['sheep', 'unicorn'])
    with pytest.raises(ValueError):
        zero_shot_split('ade')


def test_load_benchmark(voc):
    ds = load_benchmark('voc20', voc, split='train')
    assert isinstance(ds, VOCSegmentation) and len(ds) == 1 and ds.num_classes == 20
    with pytest.raises(ValueError, match='voc22'):
        load_benchmark('voc22', voc)
