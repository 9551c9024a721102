"""The zero-shot track (vilseg.proposals, vilseg.zeroshot): DDP-exact losses, resume, pseudo labels from an open_clip
checkpoint file, the VOC 15/5 and COCO-Stuff 156/15 presets on official-format fixtures, the command line and torchrun,
and the errors a user meets."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from vilseg.core import VilsegDataError
from vilseg.proposals import MaskProposalDecoder, ProposalConfig, ProposalCriterion, LossConfig, text_relations
from vilseg.world import make_world, WorldConfig
from vilseg.zeroshot import (Backbone, ZeroShotConfig, train_zeroshot, load_zeroshot, resolve_split, make_pseudo_labels,
                             zeroshot_table)
from vilseg.encoders import create_clip

BIN = Path(sys.executable).parent
TINY = dict(steps=4, batch_size=8, n_queries=6, dim=32, pixel_dim=16, log_every=1, ckpt_every=2, progress=False, device='cpu')


# ------------------------------------------------------------------ DDP: averaged gradients = one process on the whole batch
def _batch():
    g = torch.Generator().manual_seed(3)
    feats, imgs = torch.randn(4, 4, 4, 24, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    lab = torch.full((4, 32, 32), 255)
    lab[0, :16] = 1; lab[0, 16:] = 0; lab[1, 4:20, 4:28] = 3; lab[2] = 2; lab[3, :10] = 1; lab[3, 10:20] = 4; lab[3, 20:] = 0
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    return feats, imgs, lab, text


def _decoder(background):
    torch.manual_seed(0)
    d = MaskProposalDecoder(24, 16, 8, ProposalConfig(n_queries=5, dim=32, pixel_dim=16, background=background))
    with torch.no_grad():                        # randomise every bias and norm so that a dropped term shows
        for n, p in d.named_parameters():
            if p.ndim == 1: p.add_(torch.randn_like(p) * 0.3)
    return d


def _ddp_worker(rank, world, init_file, background, rank_kind, out):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    feats, imgs, lab, text = _batch()
    dec = _decoder(background)
    ddp = torch.nn.parallel.DistributedDataParallel(dec)
    sl = slice(rank * 2, rank * 2 + 2)
    crit = ProposalCriterion(LossConfig(rank=rank_kind), background=background)
    crit(ddp(feats[sl], imgs[sl], text), lab[sl], text_relations(text))['loss'].backward()
    out[rank] = torch.cat([p.grad.reshape(-1) for p in dec.parameters()])
    dist.destroy_process_group()


@pytest.mark.parametrize('background,rank_kind', [(True, 'none'), (False, 'pairwise'), (False, 'listmle')])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(tmp_path, background, rank_kind):
    "MaskFormer's num_masks normalisation (summed over ranks): DDP's mean gradient is the full-batch gradient."
    feats, imgs, lab, text = _batch()
    dec = _decoder(background)
    ProposalCriterion(LossConfig(rank=rank_kind), background=background)(dec(feats, imgs, text), lab, text_relations(text))['loss'].backward()
    full = torch.cat([p.grad.reshape(-1) for p in dec.parameters()])
    n = full.numel()
    out = torch.zeros(2, n).share_memory_()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), background, rank_kind, out), nprocs=2, join=True)
    assert torch.allclose(out[0], out[1])                                 # DDP averaged them
    rel = float((out[0] - full).norm() / full.norm())                   # float rounding only (thread count changes it)
    assert rel < 3e-5, rel                   # rounding: up to 2e-6 with 2 threads; without the all-reduce about 1
    assert full.abs().sum() > 0                 # the ranks hold 3 and 4 segments: a per-rank normalisation would not be exact


# ------------------------------------------------------------------ a tiny world and open_clip weights written by the test
@pytest.fixture(scope='module')
def world(tmp_path_factory):
    t = tmp_path_factory.mktemp('zs')
    make_world(t / 'w', n_train=64, n_val=8, cfg=WorldConfig(image_size=32), shard_size=64, workers=1, progress=False)
    model, _ = create_clip('vilseg-micro')
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.01)
    torch.save(model.state_dict(), t / 'micro_openclip.pt')
    return t


def oc(world, **kw):
    return dict(data=str(world / 'w'), model='vilseg-micro', pretrained=str(world / 'micro_openclip.pt'),
                cache_dir=str(world / 'cache'), **TINY, **kw)


def test_pseudo_labels_from_an_open_clip_checkpoint_file(world, tmp_path):
    "Both protocols, from a weights file: seen truth kept, unseen labels only where each protocol allows, quality counted."
    r = train_zeroshot(out_dir=str(tmp_path / 'a'), variant='cel_pseudo_all', pseudo_model='vilseg-micro',
                       pseudo_pretrained=str(world / 'micro_openclip.pt'), pseudo_threshold=0.0, pseudo_bg_threshold=-1.0, **oc(world))
    sp = resolve_split('world', world / 'w')
    S, U = torch.tensor(sp['seen']), torch.tensor(sp['unseen'])
    from vilseg.segdata import read_label
    pd, n_pseudo, tp = Path(r['pseudo_dir']), 0, 0
    for name, _, lp in sp['train'].items:
        y, p = read_label(lp), read_label(pd / 'SegmentationClass' / f'{name}.png')
        s = torch.isin(y, S)
        assert (p[s] == y[s]).all()                                       # seen ground truth never overwritten
        assert torch.isin(p[~s], torch.cat([U, torch.tensor([255])])).all()   # elsewhere: an unseen class or nothing
        n_pseudo += int(torch.isin(p, U).sum()); tp += int((torch.isin(p, U) & (p == y)).sum())
    q = r['pseudo_quality']
    assert q['pseudo_pixels'] == n_pseudo > 0 and q['accuracy'] == pytest.approx(tp / n_pseudo)
    assert json.loads((pd / 'meta.json').read_text())['source']['pretrained']['file'] == str(world / 'micro_openclip.pt')
    # unseen_gt: exactly the unseen ground-truth pixels get a label (threshold 0), nothing else does
    r = train_zeroshot(out_dir=str(tmp_path / 'b'), variant='cel_pseudo_gt', pseudo_model='vilseg-micro',
                       pseudo_pretrained=str(world / 'micro_openclip.pt'), pseudo_bg_threshold=-1.0, **oc(world))
    for name, _, lp in sp['train'].items[:16]:
        y, p = read_label(lp), read_label(Path(r['pseudo_dir']) / 'SegmentationClass' / f'{name}.png')
        assert torch.equal(torch.isin(p, U), torch.isin(y, U)) and torch.equal(p[torch.isin(y, S)], y[torch.isin(y, S)])
    assert 0 <= r['miou_unseen'] <= 1 and r['steps'] == 4


def test_resume_is_exact(world, tmp_path):
    "A run stopped at step 2 and resumed ends with the same weights and log as one run straight through."
    full = train_zeroshot(out_dir=str(tmp_path / 'full'), variant='cel', **oc(world))
    part = train_zeroshot(out_dir=str(tmp_path / 'part'), variant='cel', stop_at=2, **oc(world))
    assert part['stopped_at'] == 2 and not (tmp_path / 'part' / 'metrics.json').exists()
    with pytest.raises(ValueError, match='rank'):                       # another recipe cannot continue the run
        train_zeroshot(out_dir=str(tmp_path / 'part'), variant='cel', rank='listmle', resume=True, **{k: v for k, v in oc(world).items()})
    res = train_zeroshot(out_dir=str(tmp_path / 'part'), variant='cel', resume=True, **oc(world))
    a = torch.load(tmp_path / 'full' / 'checkpoint.pt', weights_only=True)['decoder']
    b = torch.load(tmp_path / 'part' / 'checkpoint.pt', weights_only=True)['decoder']
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l)['loss'] for l in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
    lb = [json.loads(l)['loss'] for l in (tmp_path / 'part' / 'metrics.jsonl').read_text().splitlines()]
    assert la == lb and len(la) == 4
    assert res['miou_seen'] == full['miou_seen'] and res['hiou'] == full['hiou']
    with pytest.raises(FileExistsError):                                # never silently overwritten
        train_zeroshot(out_dir=str(tmp_path / 'full'), variant='cel', **oc(world))


def test_errors_name_the_file_or_parameter(world, tmp_path):
    # a split naming a class that the class-name file lacks
    names = tmp_path / 'names.txt'
    names.write_text((world / 'w' / 'class_names.txt').read_text().replace('crescent, moon, crescent moon', 'pentagon'))
    with pytest.raises(VilsegDataError, match=r'names.txt.*crescent'):
        resolve_split('world', world / 'w', class_names_file=names)
    with pytest.raises(VilsegDataError, match='pentagon'):
        train_zeroshot(out_dir=str(tmp_path / 'x'), unseen='pentagon', **oc(world))
    assert not (tmp_path / 'x').exists()                                 # refused before any work
    # a pseudo-label folder made from another vocabulary or source
    bb = Backbone(model='vilseg-micro', pretrained=str(world / 'micro_openclip.pt'))
    sp = resolve_split('world', world / 'w')
    kw = dict(method='dense', bg_threshold=0.0, max_images=4, progress=False)
    make_pseudo_labels(bb, sp['train'], sp['class_names'], sp['seen'], sp['unseen'], 0, tmp_path / 'pl', 'unseen_gt', **kw)
    other = [[n + ' thing' for n in c] for c in sp['class_names']]
    with pytest.raises(VilsegDataError, match=r'meta.json.*vocabulary'):
        make_pseudo_labels(bb, sp['train'], other, sp['seen'], sp['unseen'], 0, tmp_path / 'pl', 'unseen_gt', **kw)
    bb2 = Backbone(model='vilseg-micro')                                 # other weights
    with pytest.raises(VilsegDataError, match=r'meta.json.*source'):
        make_pseudo_labels(bb2, sp['train'], sp['class_names'], sp['seen'], sp['unseen'], 0, tmp_path / 'pl', 'unseen_gt', **kw)
    # a backbone of another embedding width
    r = train_zeroshot(out_dir=str(tmp_path / 'm'), variant='baseline', **oc(world))
    with pytest.raises(VilsegDataError, match=r'checkpoint.pt.*64-d.*128-d'):
        load_zeroshot(tmp_path / 'm' / 'checkpoint.pt', backbone=Backbone(model='vilseg-tiny'))
    # nonsense values are refused at the door, naming the field
    for bad, match in ((dict(steps=0), 'steps'), (dict(variant='cell'), 'variant'), (dict(pseudo='all'), 'pseudo'),
                       (dict(rank_margin=-1.0), 'rank_margin'), (dict(upsample=3), 'upsample')):
        with pytest.raises(ValueError, match=match): ZeroShotConfig(**bad)
    with pytest.raises(ValueError, match='batch_size'):                 # 64 images cannot fill a batch of 100
        train_zeroshot(out_dir=str(tmp_path / 'y'), **{**oc(world), 'batch_size': 100})
    assert not (tmp_path / 'y').exists()


# ------------------------------------------------------------------ benchmark presets on official-format fixtures
def _write_voc(r, n_train=4, n_val=2):
    "VOC2012 layout: palette PNGs with 0 = background, 255 = border; classes 1..20 (15/5: 16-20 unseen)."
    rng = np.random.default_rng(0); ids = {}
    for split, n in (('train', n_train), ('val', n_val)):
        ids[split] = [f'2007_{split}{i:03d}' for i in range(n)]
        for k in ids[split]:
            lab = np.zeros((40, 52), np.uint8); lab[5:20, 5:25] = rng.integers(1, 16); lab[22:38, 28:50] = 16 + rng.integers(0, 5)
            lab[21] = 255
            im = Image.fromarray(lab, 'P'); im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            (r / 'SegmentationClass').mkdir(parents=True, exist_ok=True); im.save(r / 'SegmentationClass' / f'{k}.png')
            (r / 'JPEGImages').mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(r / 'JPEGImages' / f'{k}.jpg')
    (r / 'ImageSets' / 'Segmentation').mkdir(parents=True, exist_ok=True)
    for split, ks in ids.items(): (r / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(ks) + '\n')
    return r


def _write_coco_stuff(r):
    "mmseg's COCO-Stuff 164k layout: images/<split>/*.jpg, annotations/<split>/*_labelTrainIds.png (0..170, 255)."
    rng = np.random.default_rng(1)
    for split, n in (('train2017', 4), ('val2017', 2)):
        for i in range(n):
            k = f'{i:012d}'
            lab = np.full((36, 44), 255, np.uint8); lab[:18] = 19; lab[18:, :22] = 0; lab[18:, 22:] = 123   # cow (unseen), person, grass (unseen)
            (r / 'annotations' / split).mkdir(parents=True, exist_ok=True); Image.fromarray(lab).save(r / 'annotations' / split / f'{k}_labelTrainIds.png')
            (r / 'images' / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(r / 'images' / split / f'{k}.jpg')
    return r


@pytest.mark.parametrize('preset', ['voc15_5', 'coco_stuff156_15'])
def test_benchmark_presets_run_on_fixtures(world, tmp_path, preset):
    root = _write_voc(tmp_path / 'VOC2012') if preset == 'voc15_5' else _write_coco_stuff(tmp_path / 'coco_stuff164k')
    sp = resolve_split(preset, root)
    assert sp['bg_index'] is None and len(sp['unseen']) == (5 if preset == 'voc15_5' else 15)
    if preset == 'voc15_5':
        assert [sp['class_names'][i][0] for i in sp['unseen']] == ['potted plant', 'sheep', 'sofa', 'train', 'tv monitor']
    r = train_zeroshot(preset=preset, data=str(root), out_dir=str(tmp_path / 'run'), variant='cel_pseudo_gt', model='vilseg-micro',
                       pretrained=str(world / 'micro_openclip.pt'), image_size=32, eval_size=32, templates='short',
                       cache_dir=str(tmp_path / 'cache'), **{**TINY, 'batch_size': 2})
    assert r['unseen_as_background'] is None and 0 <= r['unseen_as_seen'] <= 1 and r['n_images'] == 2
    assert r['pseudo_quality']['images'] == 4 and r['pseudo_quality']['pseudo_pixels'] > 0
    assert len(r['iou']) == (20 if preset == 'voc15_5' else 171)


# ------------------------------------------------------------------ the command line and torchrun
def test_cli_and_table(world, tmp_path):
    base = [str(BIN / 'vilseg'), 'zeroshot', '--data', str(world / 'w'), '--model', 'vilseg-micro', '--pretrained',
            str(world / 'micro_openclip.pt'), '--cache-dir', str(world / 'cache'), '--steps', '3', '--batch-size', '8',
            '--n-queries', '6', '--dim', '32', '--pixel-dim', '16', '--progress', 'false', '--device', 'cpu']
    for v in ('baseline', 'cel'):
        out = subprocess.run(base + ['--variant', v, '--out-dir', str(tmp_path / 'runs' / v)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)['variant'] == v
    bad = subprocess.run(base + ['--variant', 'nope', '--out-dir', str(tmp_path / 'x')], capture_output=True, text=True)
    assert bad.returncode == 2 and 'variant' in bad.stderr and 'Traceback' not in bad.stderr
    runs, table = zeroshot_table(tmp_path / 'runs')
    assert list(table['variant']) == ['baseline', 'cel'] and (tmp_path / 'runs' / 'table.md').is_file()
    assert table.loc[0, 'hiou'] == pytest.approx(json.loads((tmp_path / 'runs' / 'baseline' / 'metrics.json').read_text())['hiou'])


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_torchrun_two_process_zeroshot(world, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [str(BIN / 'torchrun'), '--nproc_per_node', '2', '--master_port', '29547', str(BIN / 'vilseg'), 'zeroshot',
           '--data', str(world / 'w'), '--model', 'vilseg-micro', '--pretrained', str(world / 'micro_openclip.pt'),
           '--cache-dir', str(tmp_path / 'cache'), '--variant', 'cel_pseudo_gt', '--pseudo-bg-threshold', '-1',
           '--steps', '3', '--batch-size', '4', '--n-queries', '6', '--dim', '32', '--pixel-dim', '16', '--log-every', '1',
           '--progress', 'false', '--device', 'cpu', '--out-dir', str(tmp_path / 'run')]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['steps'] == 3 and m['pseudo_quality']['pseudo_pixels'] > 0
    logged = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [l['step'] for l in logged] == [1, 2, 3]


def test_finetune_trains_the_image_tower_and_loads_it_back(world, tmp_path):
    "finetune=True: the image tower changes, is saved with the decoder, and load_zeroshot gives the trained one back."
    r = train_zeroshot(out_dir=str(tmp_path / 'ft'), variant='cel', finetune=True, backbone_lr=1e-2, **oc(world))
    before = Backbone(model='vilseg-micro', pretrained=str(world / 'micro_openclip.pt')).clip.visual.state_dict()
    dec, bb, _ = load_zeroshot(tmp_path / 'ft' / 'checkpoint.pt')
    after = bb.clip.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = torch.load(tmp_path / 'ft' / 'checkpoint.pt', weights_only=True)['backbone_visual']
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert 0 <= r['miou_seen'] <= 1 and r['steps'] == 4


def test_zeroshot_notebook_runs_tiny(world, tmp_path):
    "`make zeroshot`'s notebook end to end on the tiny world with an open_clip backbone file: metrics and figures written."
    import papermill as pm
    out = tmp_path / 'run'
    pm.execute_notebook(str(Path(__file__).resolve().parents[1] / 'nbs' / 'experiments' / 'zeroshot.ipynb'), str(tmp_path / 'z.ipynb'),
                        cwd=str(tmp_path), kernel_name='python3', progress_bar=False,
                        parameters=dict(variant='cel_pseudo_gt', data=str(world / 'w'), checkpoint=None, model='vilseg-micro',
                                        pretrained=str(world / 'micro_openclip.pt'), out_dir=str(out), steps=3, batch_size=8,
                                        train_images=32, n_queries=6, cache_dir=str(tmp_path / 'cache'), progress=False,
                                        pseudo_model='vilseg-micro', pseudo_pretrained=str(world / 'micro_openclip.pt'), pseudo_bg_threshold=-1.0))
    m = json.loads((out / 'metrics.json').read_text())
    assert m['variant'] == 'cel_pseudo_gt' and m['steps'] == 3 and m['pseudo_quality']['images'] == 32
    assert 0 <= m['ensemble']['miou_unseen'] <= 1
    for f in ('per_class.png', 'predictions.png', 'checkpoint.pt'): assert (out / f).stat().st_size > 0, f
