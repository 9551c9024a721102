"""Every evaluation preset end to end on fixtures written in the official formats (vilseg.protocols, vilseg.prep).

The fixtures are converted with the data_prep converters where the official format needs one (PASCAL Context
`.mat`, COCO-Stuff stuffthingmaps, COCO instances json) and read by the preset's reader. Two models run
through each preset's full protocol (short side 448, sliding window 448/224, 80 templates, background rule):
- a colour oracle whose scores come from the pixel colours, which checks the harness itself (resizing, window
  placement, stitching, the way back to the label resolution, the background rule) against the known answer;
- a micro ViL-Seg model, which checks that a real model runs every preset.
"""
import json, math, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from vilseg.core import VilsegDataError
from vilseg.prep import coco_stuff_to_train_ids, context_to_voc_layout
from vilseg.protocols import PRESETS, get_protocol, protocol_dataset, run_protocol, write_results, evaluate_run
from vilseg.segdata import CONTEXT59, COCO_STUFF171, coco_instances_to_labels
from vilseg.vilseg import ViLSeg, ViLSegConfig

ROOT = Path(__file__).resolve().parents[1]
VILSEG = str(Path(sys.executable).parent / 'vilseg')   # the console script of the installed package
H, W = 37, 50                      # an odd size; short side 448 -> 448 x 605: two 448-windows per image
RED, GREEN, BLUE, GRAY = (220, 30, 30), (30, 200, 30), (40, 40, 230), (128, 128, 128)
COLS = [slice(0, 16), slice(16, 33), slice(33, 50)]


def regions(values, ignore_row=None):
    a = np.zeros((H, W), np.int64)
    for sl, v in zip(COLS, values): a[:, sl] = v
    if ignore_row is not None: a[ignore_row] = 255
    return a


def gray_jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True); Image.new('RGB', (W, H), GRAY).save(path, quality=100)


def png(path, a, mode='L'):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(a, np.uint8), mode=mode)
    if mode == 'P': im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    im.save(path)


# ------------------------------------------------------------------------------------------------ fixtures
def write_voc(r):
    for i in ('2007_000033', '2007_000042'):
        gray_jpg(r / 'JPEGImages' / f'{i}.jpg'); png(r / 'SegmentationClass' / f'{i}.png', regions([15, 1, 0], 20), 'P')
    (r / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    (r / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000033\n2007_000042\n')
    return r


def write_context(t):
    voc = t / 'VOC2010'; ann = t / 'trainval'; ann.mkdir(parents=True)
    names = {1: 'accordion'} | {10 + k: syn[0] for k, syn in enumerate(CONTEXT59)}
    (t / 'labels.txt').write_text('\n'.join(f'{k}: {v}' for k, v in names.items()))
    cat, sky = 10 + [s[0] for s in CONTEXT59].index('cat'), 10 + [s[0] for s in CONTEXT59].index('sky')
    (voc / 'ImageSets' / 'Main').mkdir(parents=True); (voc / 'ImageSets' / 'Main' / 'val.txt').write_text('2008_000002\n')
    savemat(ann / '2008_000002.mat', {'LabelMap': regions([cat, sky, 1]).astype(np.uint16)})
    gray_jpg(voc / 'JPEGImages' / '2008_000002.jpg')
    context_to_voc_layout(voc, ann, t / 'labels.txt', t / 'context', splits=('val',), progress=False)
    return t / 'context'


def write_coco_object(t):
    r = t / 'coco'; gray_jpg(r / 'val2017' / '000000000001.jpg')
    rect = lambda x0, x1: [[x0, 0, x1, 0, x1, H, x0, H]]
    js = dict(images=[dict(id=1, file_name='000000000001.jpg', height=H, width=W)],
              categories=[dict(id=1, name='person'), dict(id=18, name='dog')],
              annotations=[dict(id=1, image_id=1, category_id=1, iscrowd=0, area=16. * H, segmentation=rect(0, 16)),
                           dict(id=2, image_id=1, category_id=18, iscrowd=0, area=17. * H, segmentation=rect(16, 33))])
    (r / 'annotations').mkdir(parents=True); (r / 'annotations' / 'instances_val2017.json').write_text(json.dumps(js))
    coco_instances_to_labels(r / 'annotations' / 'instances_val2017.json', r / 'val2017', r / 'annotations' / 'val2017', progress=False)
    (r / 'images').mkdir(); (r / 'images' / 'val2017').symlink_to(r / 'val2017', target_is_directory=True)
    return r


def write_coco_stuff(t):
    r = t / 'coco_stuff164k'; grass = 92 + [s[0] for s in COCO_STUFF171[80:]].index('grass')
    png(t / 'maps' / '000000000139.png', regions([0, 17, grass - 1], 5))                   # COCO id - 1; 255 unlabeled
    coco_stuff_to_train_ids(t / 'maps', r / 'annotations' / 'val2017', progress=False)
    gray_jpg(r / 'images' / 'val2017' / '000000000139.jpg')
    return r


def write_ade(r):
    gray_jpg(r / 'images' / 'validation' / 'ADE_val_00000001.jpg')
    lab = regions([13, 1, 3]); lab[0] = 0                                                      # person, wall, sky; 0 = other
    png(r / 'annotations' / 'validation' / 'ADE_val_00000001.png', lab)
    return r


# preset -> (writer, {class name: colour}) ; the third column is background (grey) where the preset has one
CASES = {
    'voc21': (lambda t: write_voc(t / 'VOC2012'), {'person': RED, 'aeroplane': GREEN}),
    'voc20': (lambda t: write_voc(t / 'VOC2012'), {'person': RED, 'aeroplane': GREEN}),
    'context60': (write_context, {'cat': RED, 'sky': GREEN}),
    'context59': (write_context, {'cat': RED, 'sky': GREEN}),
    'coco_object': (write_coco_object, {'person': RED, 'dog': GREEN}),
    'coco_stuff171': (write_coco_stuff, {'person': RED, 'dog': GREEN, 'grass': BLUE}),
    'ade150': (lambda t: write_ade(t / 'ADEChallengeData2016'), {'person': RED, 'wall': GREEN, 'sky': BLUE}),
}


def colour_images(p, root, colours):
    "Paint each fixture image from its converted label map, as read by the preset's reader."
    ds, names, bg = protocol_dataset(p, root)
    col = {i: colours[n[0]] for i, n in enumerate(names) if n[0] in colours}
    for k in range(len(ds)):
        _, ip, _ = ds.items[k]; lab = ds[k]['label'].numpy()
        img = np.full((H, W, 3), GRAY, np.uint8)
        for i, c in col.items(): img[lab == i] = c
        Image.fromarray(img).save(ip, quality=100)
    return ds, names, bg


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    writer, colours = CASES[request.param]
    p = get_protocol(request.param)
    root = writer(tmp_path)
    ds, names, bg = colour_images(p, root, colours)
    return SimpleNamespace(preset=request.param, p=p, root=root, ds=ds, names=names, bg=bg, colours=colours)


class ColourOracle(torch.nn.Module):
    "Scores from pixel colours: class k scores exp(-|rgb - colour_k|^2 / 40^2); records the crops it is given."
    def __init__(self, colours):
        super().__init__(); self.colours, self.calls = colours, []
        self.clip = SimpleNamespace(logit_scale=torch.tensor(math.log(100.0)))

    def scores(self, images, class_names, method='cluster', bg_index=None, templates=None, dense='tokens', **kw):
        assert images.dtype == torch.uint8 and bg_index is None
        self.calls.append((images.shape[0], *images.shape[-2:])); self.templates = templates
        x = images.float(); out = torch.zeros(x.shape[0], len(class_names), *x.shape[-2:])
        for k, syn in enumerate(class_names):
            if syn[0] in self.colours:
                out[:, k] = torch.exp(-((x - torch.tensor(self.colours[syn[0]]).view(1, 3, 1, 1).float()) ** 2).sum(1) / 40 ** 2)
        return out


# ------------------------------------------------------------------------------------------------ tests
def test_fixture_labels_as_expected(case):
    lab = case.ds[0]['label']
    assert tuple(lab.shape) == (H, W)
    idx = {n[0]: i for i, n in enumerate(case.names)}
    first = [n for n in case.colours][0]
    assert int(lab[H // 2, 3]) == idx[first] and case.names[int(lab[H // 2, 20])][0] == list(case.colours)[1]
    third = int(lab[H // 2, 45])
    if case.p.background: assert third == 0 and case.names[0] == ['background']
    elif len(case.colours) == 3: assert case.names[third][0] == list(case.colours)[2]
    else: assert third == 255, 'background of a set without a background class is ignored'


def test_preset_harness_with_colour_oracle(case):
    m = ColourOracle(case.colours)
    r = run_protocol(m, case.preset, case.root, progress=False, thresholds=[0.0, 0.1, 1.01])
    n = len(case.ds)
    # short side 448 -> 448 x 605; a 448 window with stride 224 needs two crops per image
    assert m.calls == [(1, 448, 448)] * 2 * n
    assert len(m.templates) == 80 and m.templates[0] == 'a bad photo of a {}.'
    present = [i for i, g in enumerate(r['gt_pixels']) if g > 0]
    assert len(present) == (3 if case.p.background or len(case.colours) == 3 else 2)
    for i in present: assert r['iou'][i] > 0.9, (case.names[i], r['iou'][i])
    assert r['miou'] > 0.9 and r['n_images'] == n and r['protocol']['name'] == case.preset
    if case.p.background:
        # probability threshold 0.1: the grey region (no class near) is background; at 1.01 everything is
        sw = r['sweep']
        assert sw[0.1] == r['miou'] and sw[0.0] < 0.7 and sw[1.01] < 0.5
    # without the resize and the window the answer is the same (the colour oracle is local)
    m2 = ColourOracle(case.colours)
    r2 = run_protocol(m2, case.preset, case.root, progress=False, short_side=None, window=None)
    assert sum(c[0] for c in m2.calls) == n and {c[1:] for c in m2.calls} == {(H, W)} and r2['miou'] > 0.95


def test_preset_runs_micro_model_and_writes_results(case, tmp_path):
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16))
    for method in ('cluster', 'dense'):
        r = run_protocol(m, case.preset, case.root, method=method, progress=False)
        assert 0 <= r['miou'] <= 1 and len(r['iou']) == len(case.names)
        assert r['images_per_second'] > 0
    r = run_protocol(m, case.preset, case.root, method='dense', dense='value', progress=False)
    paths = write_results(r, tmp_path / 'out')
    saved = json.loads(paths['metrics'].read_text())
    assert saved['protocol']['short_side'] == 448 and len(saved['per_class_iou']) == len(case.names)
    assert paths['per_class'].read_text().count('\n') == len(case.names) + 1 and paths['figure'].stat().st_size > 1000


def test_world_preset_and_cli_parity(tmp_path):
    from vilseg.world import make_world
    from vilseg.train import train, TrainConfig
    make_world(tmp_path / 'w', n_train=32, n_val=6, shard_size=32, workers=1, progress=False)
    cfg = TrainConfig(data=str(tmp_path / 'w'), out_dir=str(tmp_path / 'run'), model='vilseg-micro', image_size=32,
                      local_size=16, n_local=1, batch_size=8, steps=3, num_workers=0, n_clusters=4, head_hidden=16,
                      eval_images=6, calib_images=6, progress=False)
    res = train(cfg)
    out = subprocess.run([VILSEG, 'eval', '--checkpoint', str(tmp_path / 'run' / 'checkpoint.pt'),
                          '--preset', 'world', '--data', str(tmp_path / 'w'), '--out-dir', str(tmp_path / 'ev'),
                          '--progress', 'false'], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got['miou'] == res['val']['cluster']['miou'] and got['bg_threshold'] == res['val']['cluster']['bg_threshold']
    assert (tmp_path / 'ev' / 'metrics.json').exists()
    # an existing run folder is never overwritten silently
    again = subprocess.run([VILSEG, 'eval', '--checkpoint', str(tmp_path / 'run' / 'checkpoint.pt'),
                            '--data', str(tmp_path / 'w'), '--out-dir', str(tmp_path / 'ev'), '--progress', 'false'],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode != 0 and 'exists' in again.stderr


def test_open_clip_baseline_through_cli(tmp_path):
    root = write_voc(tmp_path / 'VOC2012')
    out = subprocess.run([VILSEG, 'eval', '--model', 'vilseg-micro', '--preset', 'voc21',
                          '--data', str(root), '--dense', 'value', '--short-side', '64', '--window', '32', '--stride', '16',
                          '--thresholds', '0.05', '0.2', '--out-dir', str(tmp_path / 'ev'), '--progress', 'false'],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got['method'] == 'dense' and got['n_images'] == 2 and set(got['sweep']) == {'0.05', '0.1', '0.2'}
    saved = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    assert saved['protocol']['short_side'] == 64 and saved['protocol']['window'] == 32 and saved['dense'] == 'value'


def test_clip_baseline_warning_names_the_caller():
    """The random-weights warning points at the line that called `clip_baseline` (stacklevel 2), not into the library.
    (Outside the mutation run: mutmut's trampolines put two frames between the caller and the function.)"""
    from vilseg.protocols import clip_baseline
    with pytest.warns(UserWarning) as w:
        clip_baseline('vilseg-micro')
    assert [x.filename for x in w if 'randomly initialised' in str(x.message)] == [__file__]


def test_protocol_errors(tmp_path):
    with pytest.raises(ValueError, match='unknown protocol preset'): get_protocol('voc2077')
    with pytest.raises(ValueError, match='stride'): get_protocol('ade150', stride=0)
    with pytest.raises(VilsegDataError): run_protocol(None, 'voc21', tmp_path / 'nothing')
    with pytest.raises(ValueError, match='method'): evaluate_run(None, 'vilseg-micro', preset='voc21', data=tmp_path, method='cluster')
    for name, p in PRESETS.items():
        assert p.name == name and (p.background == (name in ('voc21', 'context60', 'coco_object', 'world')))


def _script(name, *args):
    quiet = [] if name == 'ade20k.py' else ['--quiet']          # ade20k.py shows no progress bar
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / name), *map(str, args), *quiet], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_data_prep_scripts_end_to_end(tmp_path):
    import zipfile
    from vilseg.segdata import read_label, VOCSegmentation, PascalContext, CocoStuff, ADE20K
    # VOC + SBD aug: SBD's GTcls.Segmentation .mat files become PNGs; trainaug = SBD train+val + VOC train - VOC val
    voc = write_voc(tmp_path / 'VOC2012')
    (voc / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('2007_000042\n')
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'; (sbd / 'cls').mkdir(parents=True)
    (sbd / 'train.txt').write_text('2008_000001\n2007_000033\n'); (sbd / 'val.txt').write_text('2008_000002\n')
    for i in ('2008_000001', '2008_000002', '2007_000033'):
        savemat(sbd / 'cls' / f'{i}.mat', {'GTcls': {'Segmentation': regions([15, 1, 0]).astype(np.uint8)}})
    st = _script('voc.py', '--voc-root', voc, '--sbd', sbd.parent)
    # 2007_000033 has a VOC label (VOC's wins); both VOC ids are in val, so aug keeps the two SBD-only ids
    assert st['val']['images'] == 2 and st['aug']['trainaug'] == 2 and st['aug']['sbd'] == 2
    assert (voc / 'ImageSets' / 'Segmentation' / 'trainaug.txt').read_text().split() == ['2008_000001', '2008_000002']
    assert read_label(voc / 'SegmentationClassAug' / '2008_000002.png')[0, :3].tolist() == [15, 15, 15]
    # PASCAL Context from the official .mat files
    t = tmp_path / 'ctx_src'; t.mkdir()
    write_context(t)                                      # writes the official inputs (and converts once in-process)
    st = _script('pascal_context.py', '--voc2010', t / 'VOC2010', '--annotations', t / 'trainval', '--out', tmp_path / 'pc', '--splits', 'val')
    assert st['images'] == {'val': 1}
    assert read_label(tmp_path / 'pc' / 'SegmentationClassContext' / '2008_000002.png').tolist() == \
        read_label(t / 'context' / 'SegmentationClassContext' / '2008_000002.png').tolist()
    assert len(PascalContext(tmp_path / 'pc', 'val', 60)) == 1
    # COCO-Stuff
    png(tmp_path / 'maps' / 'val2017' / '000000000139.png', regions([0, 17, 255]))
    gray_jpg(tmp_path / 'coco' / 'val2017' / '000000000139.jpg')
    st = _script('coco_stuff.py', '--maps', tmp_path / 'maps', '--images', tmp_path / 'coco', '--out', tmp_path / 'stuff')
    ds = CocoStuff(tmp_path / 'stuff')      # stored value 17 = COCO id 18 (dog), the 17th thing class: train id 16
    assert st['written'] == 1 and ds[0]['label'][0, [0, 20, 40]].tolist() == [0, 16, 255] and ds.class_names[16][0] == 'dog'
    # ADE20K: check in place, and unpack a zip
    ade = write_ade(tmp_path / 'ADEChallengeData2016')
    assert _script('ade20k.py', '--root', ade)['images'] == 1
    with zipfile.ZipFile(tmp_path / 'ade.zip', 'w') as z:
        for f in ade.rglob('*'):
            if f.is_file(): z.write(f, f.relative_to(tmp_path))
    st = _script('ade20k.py', '--zip', tmp_path / 'ade.zip', '--out', tmp_path / 'unz')
    assert st['images'] == 1 and len(ADE20K(tmp_path / 'unz' / 'ADEChallengeData2016')) == 1
    # a label outside 0..150 is reported with its file
    png(ade / 'annotations' / 'validation' / 'ADE_val_00000001.png', np.full((H, W), 200))
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'ade20k.py'), '--root', str(ade)], capture_output=True, text=True)
    assert r.returncode == 1 and 'ADE_val_00000001.png' in r.stderr
