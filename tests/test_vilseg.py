"""ViL-Seg: distributed losses (2 gloo processes), open_clip checkpoint loading, segmentation on odd sizes."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vilseg.losses import cross_modal_loss, vision_contrast_loss, attentive_cross_modal_loss, multi_label_contrast_loss

BIN = Path(sys.executable).parent


def _worker(rank, world, init_file, img, txt, loc, tgt, out, pz=None):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    B = img.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    i, t = img[sl].clone().requires_grad_(), txt[sl].clone()
    lc = cross_modal_loss(i, t, torch.tensor(10.))
    lc.backward()
    lv = vision_contrast_loss(loc[sl], tgt[sl], 0.1)
    la = attentive_cross_modal_loss(pz[sl], txt[sl], torch.tensor(10.))
    out[rank] = torch.stack([lc.detach(), lv.detach(), i.grad.abs().sum(), la.detach()])
    dist.destroy_process_group()


def test_two_process_losses_see_all_negatives(tmp_path):
    torch.manual_seed(0)
    N, D = 8, 16
    img, txt = F.normalize(torch.randn(N, D), dim=-1), F.normalize(torch.randn(N, D), dim=-1)
    loc, tgt = F.normalize(torch.randn(N, 3, D), dim=-1), F.normalize(torch.randn(N, D), dim=-1)
    pz = F.normalize(torch.randn(N, 5, D), dim=-1)
    out = torch.zeros(2, 4).share_memory_()
    mp.spawn(_worker, args=(2, str(tmp_path / 'init'), img, txt, loc, tgt, out, pz), nprocs=2, join=True)
    full_c = cross_modal_loss(img, txt, torch.tensor(10.))
    full_v = vision_contrast_loss(loc, tgt, 0.1)
    # each rank's cross-modal loss is the loss over the whole global batch (all-gathered negatives) ...
    assert torch.allclose(out[:, 0], full_c.expand(2), atol=1e-5)
    # ... and the ranks' vision losses average to the single-process loss over the whole batch
    assert torch.allclose(out[:, 1].mean(), full_v, atol=1e-5)
    # with local negatives only, the losses would differ:
    local_only = torch.stack([cross_modal_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], torch.tensor(10.)) for r in range(2)])
    assert not torch.allclose(local_only, full_c.expand(2), atol=1e-3)
    assert (out[:, 2] > 0).all(), 'gradients reach each rank\'s local embeddings'
    assert torch.allclose(out[:, 3], attentive_cross_modal_loss(pz, txt, torch.tensor(10.)).expand(2), atol=1e-5)


# per rank: captions' nouns, and the distinct words of the rank's batch (different counts on the two ranks)
NOUNS = [[['star', 'red'], ['ring'], ['box']], [['star'], ['tree', 'ring'], []]]
WORDS = [sorted({w for ns in r for w in ns}) for r in NOUNS]


def _noun_worker(rank, world, init_file, img, emb, out):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    i = img[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    e = emb[rank][:len(WORDS[rank])].clone().requires_grad_()
    loss = multi_label_contrast_loss(i, NOUNS[rank], e, WORDS[rank], torch.tensor(10.))
    loss.backward()
    out[rank] = torch.stack([loss.detach(), i.grad.abs().sum(), e.grad.abs().sum()])
    dist.destroy_process_group()


def test_two_process_noun_contrast_sees_all_ranks(tmp_path):
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    emb = torch.zeros(2, 4, 8)
    for r in range(2): emb[r, :len(WORDS[r])] = F.normalize(torch.randn(len(WORDS[r]), 8), dim=-1)
    out = torch.zeros(2, 3).share_memory_()
    mp.spawn(_noun_worker, args=(2, str(tmp_path / 'init'), img, emb, out), nprocs=2, join=True)
    # every rank computes the loss of the whole global batch against the distinct prompts of all ranks: a word on both
    # ranks ('star', 'ring') is one prompt, rank 0's copy (the first rank that has it)
    extra = [i for i, w in enumerate(WORDS[1]) if w not in WORDS[0]]
    full = multi_label_contrast_loss(img, NOUNS[0] + NOUNS[1], torch.cat([emb[0, :len(WORDS[0])], emb[1, extra]]),
                                     WORDS[0] + [WORDS[1][i] for i in extra], torch.tensor(10.))
    assert torch.allclose(out[:, 0], full.expand(2), atol=1e-5)
    assert (out[:, 1] > 0).all() and (out[:, 2] > 0).all(), 'gradients reach each rank\'s images and prompts'


@pytest.mark.skipif(shutil.which('torchrun', path=str(BIN)) is None, reason='torchrun not installed')
def test_torchrun_two_process_training(tmp_path):
    from vilseg.world import make_world
    make_world(tmp_path / 'w', n_train=64, n_val=4, shard_size=64, workers=1, progress=False)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [str(BIN / 'torchrun'), '--nproc_per_node', '2', '--master_port', '29533', str(BIN / 'vilseg'), 'train',
           '--data', str(tmp_path / 'w'), '--out-dir', str(tmp_path / 'run'), '--model', 'vilseg-micro', '--image-size', '32',
           '--local-size', '16', '--n-local', '1', '--n-clusters', '4', '--head-hidden', '16', '--batch-size', '4', '--steps', '3',
           '--num-workers', '0', '--eval-images', '4', '--calib-images', '4', '--progress', 'false', '--log-every', '1',
           '--lambda-nouns', '1', '--noun-min-count', '2', '--noun-bank', 'true']
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert m['world_size'] == 2 and m['steps'] == 3
    assert (tmp_path / 'run' / 'checkpoint.pt').exists()
    vocab = (tmp_path / 'run' / 'noun_vocab.txt').read_text().split()
    assert len(vocab) > 5 and 'the' not in vocab and 'and' not in vocab
    logged = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    assert all('nouns' in r and 'bank_distill' in r for r in logged if 'loss' in r)
    bank = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)['model']['noun_bank.weight']
    assert bank.shape[0] == len(vocab)        # the bank exists before DDP wraps the model, so its gradients are averaged


def test_load_vit_b16_checkpoint_file(tmp_path):
    import open_clip
    from vilseg.encoders import create_clip, image_features
    from vilseg.views import normalize
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-B-16', pretrained=None)
    path = tmp_path / 'vit_b16.pt'
    torch.save(ref.state_dict(), path)
    model, tok = create_clip('ViT-B-16', pretrained=str(path))
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    model.eval()
    x = normalize(torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8))
    with torch.no_grad():
        f = image_features(model, x)
        fv = image_features(model, normalize(torch.randint(0, 255, (1, 3, 240, 176), dtype=torch.uint8)), dense='value')
        assert f['patches'].shape == (1, 14, 14, 512) and torch.allclose(f['global'], model.encode_image(x), atol=1e-4)
        assert fv['patches'].shape == (1, 15, 11, 512)
    with pytest.raises(FileNotFoundError):
        create_clip('ViT-B-16', pretrained=str(tmp_path / 'missing.pt'))


@pytest.mark.parametrize('hw', [(33, 47), (64, 64), (100, 30), (8, 8)])
def test_segment_odd_sizes(hw):
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    from vilseg.evaluate import slide_scores
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16)).eval()
    names = [['background'], ['star'], ['ring', 'donut']]
    x = torch.randint(0, 255, (2, 3, *hw), dtype=torch.uint8)
    for method in ('cluster', 'dense'):
        lab = m.segment(x, names, method=method, bg_index=0, bg_threshold=0.1)
        assert lab.shape == (2, *hw) and lab.dtype == torch.int64 and lab.max() <= 2
    S = slide_scores(m, x, names, window=32, stride=16, bg_index=0, bg_threshold=0.1)
    assert S.shape == (2, 3, *hw) and torch.isfinite(S).all()


def _bank_worker(rank, world, init_file, out):
    import datetime
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16, lambda_nouns=1.0, lambda_vision=0,
                            lambda_cluster=0, noun_bank=True, noun_parse='heads', noun_pool='patches'))
    m.set_noun_vocab(['star', 'ring', 'box', 'tree'])
    before = m.noun_bank.weight.detach().clone()
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    torch.manual_seed(1 + rank)                      # different images per rank; rank 1's captions have no nouns at all
    batch = {'global': torch.randn(2, 3, 32, 32), 'caption': [['a star and a ring', 'a box'], ['', '']][rank]}
    o = ddp(batch, step=0)
    o['loss'].backward(); opt.step()
    out[rank, 0] = m.noun_bank.weight.detach().flatten()
    out[rank, 1] = before.flatten()
    dist.destroy_process_group()


def test_two_process_noun_bank_stays_in_sync(tmp_path):
    """The noun bank under DDP: a step where one rank has no nouns neither hangs nor desynchronises the ranks' banks;
    the rows of the other rank's nouns move on both ranks (their gradient is averaged), the unused row does not."""
    out = torch.zeros(2, 2, 4 * 64).share_memory_()
    mp.spawn(_bank_worker, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    after, before = out[:, 0].view(2, 4, 64), out[:, 1].view(2, 4, 64)
    assert torch.equal(before[0], before[1]) and torch.equal(after[0], after[1]), 'the two ranks hold the same bank'
    moved = (after[0] - before[0]).abs().sum(1) > 0
    assert moved.tolist() == [True, True, True, False], moved      # star, ring, box in rank 0's captions; tree nowhere
