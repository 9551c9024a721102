"""Caption readers on fixtures written here: CSV/TSV, webdataset shards, COCO JSON, and every kind of bad input."""
import io, json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vilseg.core import VilsegDataError
from vilseg.captions import (CocoCaptions, CsvCaptions, DataHealth, WdsCaptions, collate_captions, decode_caption,
                             load_image)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _bytes(im, fmt='PNG', **kw):
    b = io.BytesIO(); im.save(b, fmt, **kw); return b.getvalue()


def _noise_jpg(seed=0, size=48):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return _bytes(Image.fromarray(arr), 'JPEG')


@pytest.fixture
def images(tmp_path):
    d = tmp_path / 'img'; d.mkdir()
    for i, c in enumerate(COLOURS): Image.new('RGB', (16, 12), c).save(d / f'{i}.png')
    return d


# ---------------------------------------------------------------- CSV / TSV
@pytest.mark.parametrize('ext,sep', [('tsv', '\t'), ('csv', ',')])
def test_csv_and_tsv(tmp_path, images, ext, sep):
    rows = [f'img/{i}.png{sep}a {n} square' for i, n in enumerate(['red', 'green', 'blue', 'yellow'])]
    f = tmp_path / f'pairs.{ext}'
    f.write_text(f'filepath{sep}title\n' + '\n'.join(rows) + '\n')
    ds = CsvCaptions(f)
    assert len(ds) == 4 and ds.health.n_skipped == 0
    for i in range(4):
        x = ds[i]
        assert x['image'].dtype == torch.uint8 and x['image'].shape == (3, 12, 16)
        assert x['image'][:, 5, 5].tolist() == list(COLOURS[i]) and x['key'] == f'img/{i}.png'
    assert ds[2]['caption'] == 'a blue square'
    b = collate_captions([ds[i] for i in range(4)])
    assert b['image'].shape == (4, 3, 12, 16) and b['n_skipped'] == 0 and len(b['caption']) == 4


def test_csv_custom_columns_root_and_transform(tmp_path, images):
    f = tmp_path / 'meta' / 'x.csv'; f.parent.mkdir()
    f.write_text('path,text\n0.png,red\n1.png,green\n')
    ds = CsvCaptions(f, root=images, img_key='path', caption_key='text', transform=lambda t: t.float().mean())
    assert len(ds) == 2 and isinstance(ds[0]['image'], torch.Tensor) and ds[0]['image'].ndim == 0


def test_csv_bad_rows_counted(tmp_path, images):
    (images / 'corrupt.jpg').write_bytes(_noise_jpg()[:400])
    (images / 'trunc.jpg').write_bytes(_noise_jpg(1)[:-300])
    f = tmp_path / 'pairs.tsv'
    f.write_bytes(b'filepath\ttitle\n'
                  b'img/0.png\tred\n'
                  b'img/missing.png\tghost\n'
                  b'img/1.png\t   \n'
                  b'img/2.png\tcaf\xe9 latin-1\n'
                  b'img/3.png\tyellow\n'
                  b'img/corrupt.jpg\tbroken\n'
                  b'img/trunc.jpg\ttruncated\n')
    ds = CsvCaptions(f)
    assert len(ds) == 4                       # 0, 3, corrupt, trunc pass the construction checks
    s = ds.health.summary()
    assert s.startswith('skipped 3 of 7 samples: ')
    assert '1 missing file (img/missing.png)' in s and '1 empty caption (img/1.png (line 4))' in s
    assert '1 non-UTF-8 caption (img/2.png (line 5))' in s
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_captions, num_workers=0)
    (batch,) = list(loader)
    assert batch['n_skipped'] == 2 and batch['caption'] == ['red', 'yellow']
    s = ds.health.summary()
    assert s.startswith('skipped 5 of 7 samples') and '2 corrupt image (' in s
    assert 'corrupt.jpg' in s and 'trunc.jpg' in s
    assert ds.health.as_dict()['reasons']['corrupt image']['count'] == 2


def test_csv_nothing_valid_raises(tmp_path):
    f = tmp_path / 'empty.csv'; f.write_text('filepath,title\nnope.png,a\n')
    with pytest.raises(VilsegDataError, match='empty.csv'): CsvCaptions(f)
    with pytest.raises(VilsegDataError, match='missing.csv'): CsvCaptions(tmp_path / 'missing.csv')
    f2 = tmp_path / 'cols.csv'; f2.write_text('file,caption\na.png,b\n')
    with pytest.raises(VilsegDataError, match="cols.csv: no column 'filepath'"): CsvCaptions(f2)


# ---------------------------------------------------------------- webdataset shards
def _write_shards(d):
    good = _bytes(Image.new('RGB', (10, 10), (30, 60, 90)), 'PNG')
    n = 0
    for k in range(2):
        with wds.TarWriter(str(d / f'{k:05d}.tar')) as w:
            for j in range(4):
                key = f'{k:05d}{j:04d}'
                s = {'__key__': key, 'png': good, 'txt': f'sample {key}'.encode(), 'json': json.dumps({'key': key}).encode()}
                if (k, j) == (0, 2): s = {'__key__': key, 'jpg': _noise_jpg()[:500], 'txt': b'corrupt'}
                if (k, j) == (1, 1): del s['txt']
                w.write(s); n += 1
    return n


def test_wds_shards_through_dataloader(tmp_path):
    d = tmp_path / 'shards'; d.mkdir()
    n = _write_shards(d)
    for urls in (str(d / '{00000..00001}.tar'), [str(d / '00000.tar'), str(d / '00001.tar')], d):
        ds = WdsCaptions(urls)
        batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_captions, num_workers=0))
        keys = [k for b in batches for k in b.get('key', [])]
        assert len(keys) == n - 2 and '000000002' not in keys and '000010001' not in keys
        assert sum(b['n_skipped'] for b in batches) == 2
        assert all(b['image'].shape[1:] == (3, 10, 10) for b in batches if 'image' in b)
        assert batches[0]['image'][0, :, 0, 0].tolist() == [30, 60, 90]
        assert ds.health.counts == {'corrupt image': 1, 'missing caption': 1}
        s = ds.health.summary()
        assert s.startswith(f'skipped 2 of {n} samples') and '00000.tar:000000002.jpg' in s and '00001.tar:000010001' in s


def test_wds_shuffle_is_seeded(tmp_path):
    d = tmp_path / 'shards'; d.mkdir(); _write_shards(d)
    keys = lambda ds: [x['key'] for x in ds if x is not None]
    a, b = keys(WdsCaptions(d, shuffle=8, seed=3)), keys(WdsCaptions(d, shuffle=8, seed=3))
    assert a == b and sorted(a) == sorted(keys(WdsCaptions(d)))


def test_wds_truncated_shard_does_not_crash(tmp_path):
    d = tmp_path / 'shards'; d.mkdir(); n = _write_shards(d)
    raw = (d / '00001.tar').read_bytes(); (d / '00001.tar').write_bytes(raw[:len(raw) // 2 + 100])
    ds = WdsCaptions(d)
    got = [x for x in ds if x is not None]
    assert 3 <= len(got) < n - 2 and ds.health.n_skipped >= 1


def test_wds_missing_shard(tmp_path):
    _write_shards(tmp_path)
    with pytest.raises(VilsegDataError, match='00002.tar: missing shard'): WdsCaptions(str(tmp_path / '{00000..00002}.tar'))
    with pytest.raises(VilsegDataError, match=r'2 of 2 shards missing: 00006.tar, 00007.tar'):
        WdsCaptions([str(tmp_path / '00006.tar'), str(tmp_path / '00007.tar')])
    empty = tmp_path / 'empty'; empty.mkdir()
    with pytest.raises(VilsegDataError, match='no .tar shards'): WdsCaptions(empty)


# ---------------------------------------------------------------- COCO captions
def test_coco(tmp_path, images):
    meta = dict(images=[dict(id=i, file_name=f'{i}.png') for i in range(4)] + [dict(id=9, file_name='gone.png')],
                annotations=[dict(id=100 + i, image_id=i // 2, caption=f'caption {i}') for i in range(6)]
                + [dict(id=200, image_id=3, caption='\n'), dict(id=201, image_id=9, caption='a lost image')])
    f = tmp_path / 'captions_train2017.json'; f.write_text(json.dumps(meta))
    ds = CocoCaptions(f, images)
    assert len(ds) == 3                                                  # image 3 has only an empty caption
    assert ds.health.counts == {'no caption': 1, 'missing file': 1}
    assert ds.health.partial == {'empty caption': 1}
    assert 'missing file (gone.png)' in ds.health.summary()
    torch.manual_seed(1); c1 = [ds[0]['caption'] for _ in range(16)]
    torch.manual_seed(1); c2 = [ds[0]['caption'] for _ in range(16)]
    assert c1 == c2 and set(c1) == {'caption 0', 'caption 1'}
    x = CocoCaptions(f, images, caption_index=1)[2]
    assert x['caption'] == 'caption 5' and x['key'] == '2' and x['image'][:, 0, 0].tolist() == list(COLOURS[2])


def test_coco_bad_json(tmp_path):
    f = tmp_path / 'c.json'; f.write_text('{"images": [')
    with pytest.raises(VilsegDataError, match='c.json: invalid JSON'): CocoCaptions(f, tmp_path)
    f.write_text('{"images": []}')
    with pytest.raises(VilsegDataError, match='c.json'): CocoCaptions(f, tmp_path)
    f.write_text('{"images": [{"id": 1, "file_name": "x.png"}], "annotations": []}')
    with pytest.raises(VilsegDataError, match='c.json: no usable samples'): CocoCaptions(f, tmp_path)


# ---------------------------------------------------------------- images: every mode and every failure
def test_image_modes_converted(tmp_path):
    grey = Image.new('L', (2, 2), 123); grey.save(tmp_path / 'g.png')
    assert load_image(tmp_path / 'g.png').unique().tolist() == [123]
    rgba = Image.new('RGBA', (2, 1), (100, 200, 50, 255)); rgba.putpixel((1, 0), (100, 200, 50, 51))
    t = load_image(_bytes(rgba))
    assert t[:, 0, 0].tolist() == [100, 200, 50] and t[:, 0, 1].tolist() == [100, 200, 50]   # alpha dropped
    la = Image.new('LA', (1, 1), (255, 0))
    assert load_image(_bytes(la))[:, 0, 0].tolist() == [255, 255, 255]
    g16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert load_image(_bytes(g16))[0, 0].tolist() == [0, 100, 255]                              # scaled, not clipped
    pal = Image.new('P', (3, 1)); pal.putpalette([1, 2, 3, 40, 50, 60, 200, 100, 0] + [0] * 759)
    for x in range(3): pal.putpixel((x, 0), x)
    assert load_image(_bytes(pal))[:, 0, :].T.tolist() == [[1, 2, 3], [40, 50, 60], [200, 100, 0]]
    assert load_image(_bytes(pal, transparency=1))[:, 0, :].T.tolist() == [[1, 2, 3], [40, 50, 60], [200, 100, 0]]  # alpha dropped
    cmyk = Image.new('CMYK', (1, 1), (0, 0, 0, 0))                                            # white
    assert load_image(_bytes(cmyk, 'TIFF'))[:, 0, 0].tolist() == [255, 255, 255]
    assert load_image(_bytes(Image.new('1', (1, 1), 1)))[:, 0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize('kind,content', [('corrupt image', b'definitely not an image'),
                                          ('corrupt image', 'truncated'), ('zero-size image', b'')])
def test_bad_images_name_the_file(tmp_path, kind, content):
    if content == 'truncated': content = _noise_jpg()[:-200]
    f = tmp_path / 'bad_file.jpg'; f.write_bytes(content)
    with pytest.raises(VilsegDataError, match='bad_file.jpg') as e: load_image(f)
    assert e.value.kind == kind
    with pytest.raises(VilsegDataError, match='shard.tar:k.jpg'): load_image(content, name='shard.tar:k.jpg')


def test_missing_image(tmp_path):
    with pytest.raises(VilsegDataError, match='nope.png: missing file'): load_image(tmp_path / 'nope.png')


# ---------------------------------------------------------------- captions
def test_captions():
    assert decode_caption(b'\xef\xbb\xbf  two\n\nlines\t here ') == 'two lines here'
    assert decode_caption('naïve café'.encode()) == 'naïve café'
    with pytest.raises(VilsegDataError, match='k.txt: empty caption'): decode_caption(b' \n ', name='k.txt')
    with pytest.raises(VilsegDataError, match='k.txt: non-UTF-8 caption'): decode_caption(b'\xff\xfe', name='k.txt')


def test_datahealth():
    h = DataHealth(); h.seen(1000)
    h.skip('missing file', 'a.jpg'); h.skip('missing file', 'b.jpg'); h.skip('empty caption', 'c')
    assert h.summary() == 'skipped 3 of 1000 samples: 2 missing file (a.jpg, b.jpg), 1 empty caption (c)'
    assert h.as_dict()['skipped'] == 3 and h.as_dict()['seen'] == 1000


def test_collate_all_bad():
    assert collate_captions([None, None, None]) == {'n_skipped': 3}
    s = dict(image=torch.zeros(3, 2, 2, dtype=torch.uint8), caption='x', key='k')
    t = dict(image=torch.zeros(3, 4, 2, dtype=torch.uint8), caption='y', key='j')
    with pytest.raises(ValueError, match='different sizes'): collate_captions([s, t])
