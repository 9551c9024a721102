"""A newcomer's first hour, scripted through the command line in subprocesses: each bad input gives one line on stderr
(`vilseg: error: ...`) with the right exit status (2 bad usage, 1 bad data) and no traceback; `--debug` keeps it; a
recipe trains a tiny world; `vilseg segment --model` segments a 500x375 JPEG with an open_clip weights file written here."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TQDM_DISABLE': '1'}


def vilseg(*args, timeout=600):
    return subprocess.run([str(BIN / 'vilseg'), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def assert_one_line_error(r, status, *words):
    err = r.stderr.strip().splitlines()
    assert r.returncode == status, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr[-2000:]
    msgs = [l for l in err if l.startswith('vilseg: error: ')]
    assert len(msgs) == 1, err
    for w in words: assert w in msgs[0], (w, msgs[0])
    assert not any('No pretrained weights loaded' in l for l in err), err


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from vilseg.world import make_world
    d = tmp_path_factory.mktemp('newcomer')
    make_world(d / 'w', n_train=96, n_val=6, shard_size=96, workers=1, progress=False)
    return d


def test_bad_values_are_refused_at_the_door(world):
    d = world
    for args, words in ((['--steps', '-5'], ['steps=-5', '>= 1']), (['--batch-size', '0'], ['batch_size=0']),
                        (['--lr', '-0.001'], ['lr=-0.001', '> 0']), (['--local-scale', '0.1', '1.5'], ['local_scale']),
                        (['--n-clusters', '65'], ['n_clusters=65', '64 patches']), (['--noun-pool', 'pixels'], ['noun_pool']),
                        (['--model', 'ViT-X-99'], ['ViT-X-99']), (['--recipe', 'nope'], ['unknown recipe', 'demo'])):
        out = d / f'run{abs(hash(tuple(args)))}'
        r = vilseg('train', '--recipe', 'demo', '--data', d / 'w', '--out-dir', out, *args)
        assert_one_line_error(r, 2, *words)
        assert not out.exists(), f'{args}: a run folder was made before the values were checked'
    r = vilseg('train', '--data', d / 'missing_world', '--out-dir', d / 'r_missing')
    assert_one_line_error(r, 1, 'missing_world')
    assert not (d / 'r_missing').exists()
    r = vilseg('--help')
    assert r.returncode == 0


def test_bad_files_are_one_line_errors(world):
    d = world
    img = next((d / 'w' / 'JPEGImages').glob('val_*.jpg'))
    (d / 'text.pt').write_text('not a checkpoint\n')
    torch.save({'weight': torch.zeros(3)}, d / 'foreign.pt')                       # a plain state dict, not a training run
    data = img.read_bytes(); (d / 'truncated.jpg').write_bytes(data[:len(data) // 2])
    cases = [
        (['segment', '--checkpoint', d / 'missing.pt', '--image', img, '--classes', 'star', '--out', d / 'm.png'], 1, ['missing.pt']),
        (['segment', '--checkpoint', d / 'text.pt', '--image', img, '--classes', 'star', '--out', d / 'm.png'], 1, ['text.pt', 'cannot load']),
        (['segment', '--checkpoint', d / 'foreign.pt', '--image', img, '--classes', 'star', '--out', d / 'm.png'], 1, ['foreign.pt', 'not a vilseg']),
        (['eval', '--checkpoint', d / 'missing.pt', '--preset', 'world', '--data', d / 'w'], 1, ['missing.pt']),
        (['eval', '--checkpoint', d / 'foreign.pt', '--preset', 'nope', '--data', d / 'w'], 2, ['nope']),
        (['segment', '--checkpoint', d / 'foreign.pt', '--image', d / 'nothere.jpg', '--classes', 'star', '--out', d / 'm.png'], 1, ['nothere.jpg']),
    ]
    for args, status, words in cases:
        assert_one_line_error(vilseg(*args), status, *words)
    # --debug: the traceback is kept
    r = vilseg('segment', '--checkpoint', d / 'text.pt', '--image', img, '--classes', 'star', '--out', d / 'm.png', '--debug')
    assert r.returncode != 0 and 'Traceback' in r.stderr


def test_recipe_trains_a_tiny_world_and_errors_on_its_checkpoint(world):
    d = world
    out = d / 'recipe_run'
    r = vilseg('train', '--recipe', 'demo', '--steps', '20', '--data', d / 'w', '--out-dir', out, '--batch-size', '16',
               '--eval-images', '4', '--calib-images', '4', '--num-workers', '0', '--pamr-iters', '2', '--progress', 'false',
               '--noun-min-count', '2')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'No pretrained weights loaded' not in r.stderr
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['recipe'] == 'demo' and cfg['steps'] == 20 and cfg['lambda_nouns'] == 3.0 and cfg['noun_bank'] is True
    assert cfg['batch_size'] == 16 and cfg['n_clusters'] == 64          # the override, and the recipe's value
    # a truncated image and a checkpoint of another model: one line each, naming the file
    img = next((d / 'w' / 'JPEGImages').glob('val_*.jpg'))
    data = img.read_bytes(); (d / 'cut.jpg').write_bytes(data[:len(data) // 3])
    r = vilseg('segment', '--checkpoint', out / 'checkpoint.pt', '--image', d / 'cut.jpg', '--classes', 'star,ring', '--out', d / 'm.png')
    assert_one_line_error(r, 1, 'cut.jpg')
    ck = torch.load(out / 'checkpoint.pt', weights_only=True); ck['config']['n_clusters'] = 8
    (d / 'other').mkdir(exist_ok=True); torch.save(ck, d / 'other' / 'checkpoint.pt')
    r = vilseg('segment', '--checkpoint', d / 'other' / 'checkpoint.pt', '--image', img, '--classes', 'star', '--out', d / 'm.png')
    assert_one_line_error(r, 1, 'checkpoint.pt', 'do not fit')
    # the checkpoint segments a folder: one mask each, and a JSON summary
    r = vilseg('segment', '--checkpoint', out / 'checkpoint.pt', '--image', d / 'w' / 'JPEGImages', '--classes', 'star,ring|donut',
               '--out', d / 'masks', '--overlay', d / 'overlays')
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    n = len(list((d / 'w' / 'JPEGImages').glob('*.jpg')))
    assert len(s['images']) == n and len(list((d / 'masks').glob('*.png'))) == n and len(list((d / 'overlays').glob('*.png'))) == n


def test_segment_your_own_jpeg_with_an_open_clip_weights_file(tmp_path):
    import open_clip
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-B-32', pretrained=None)
    torch.save(ref.state_dict(), tmp_path / 'vit_b32.pt')
    rng = np.random.default_rng(0)
    a = np.zeros((375, 500, 3), np.uint8); a[:, :250] = (200, 30, 30); a[:, 250:] = (30, 30, 200)
    a = (a + rng.integers(0, 20, a.shape)).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / 'photo.jpg', quality=90)
    r = vilseg('segment', '--model', 'ViT-B-32', '--pretrained', tmp_path / 'vit_b32.pt', '--image', tmp_path / 'photo.jpg',
               '--classes', 'red wall,blue wall|blue paint', '--out', tmp_path / 'mask.png', '--overlay', tmp_path / 'overlay.png')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'No pretrained weights loaded' not in r.stderr
    s = json.loads(r.stdout)
    mask = np.asarray(Image.open(tmp_path / 'mask.png'))
    assert mask.shape == (375, 500) and mask.max() <= 2 and s['images']['size'] == [375, 500]
    assert s['classes'] == ['background', 'red wall', 'blue wall'] and s['dense'] == 'maskclip'
    shares = s['images']['shares']
    assert abs(sum(shares.values()) - 1) < 1e-3
    for k, v in shares.items(): assert abs(v - float((mask == s['classes'].index(k)).mean())) < 1e-3
    ov = Image.open(tmp_path / 'overlay.png'); assert ov.size[0] > 500       # the image plus its colour key
    # no weights at all: said once, in our words
    r = vilseg('segment', '--model', 'ViT-B-32', '--image', tmp_path / 'photo.jpg', '--classes', 'wall', '--out', tmp_path / 'm2.png')
    assert r.returncode == 0 and r.stderr.count('randomly initialised') == 1 and 'No pretrained weights loaded' not in r.stderr
