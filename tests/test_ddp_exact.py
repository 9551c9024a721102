"""ViL-Seg under DDP optimises the objective of one process on the concatenated batch.

Each test runs 2 gloo processes and compares the gradients they produce (averaged over ranks, as DDP averages them)
with the gradients of one process on the whole batch, computed here in the test process:
- the noun contrast with nouns shared by both ranks (a shared noun is one prompt of the global batch, GroupViT's
  multi-label contrast, `GroupViT/models/multi_label_contrastive.py`, over distinct words);
- IIC with the joint distribution of both ranks' patch pairs (`xu-ji/IIC code/utils/cluster/IID_losses.py`), also with
  unequal counts per rank;
- the whole demo recipe and the paper's recipe through `torch.nn.parallel.DistributedDataParallel` on `vilseg-micro`
  (GroupNorm stem: no per-rank batch statistics).
Also: the paired and local views leave BatchNorm's running statistics alone, and PAMR at a quarter of the input size
equals a reference computation written here from the paper's equation and TCL's placement (`tcl/models/tcl/tcl.py`
`apply_pamr`: the image resized bilinearly with align_corners=True to the mask's size).
"""
import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vilseg.losses import multi_label_contrast_loss, iic_loss

# per rank: each caption's nouns; 'star' and 'ring' are on both ranks
NOUNS = [[['star', 'red'], ['ring'], ['box', 'star']], [['star'], ['tree', 'ring'], []]]
VOCAB = ['star', 'red', 'ring', 'box', 'tree']


def _init(rank, world, init_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _noun_setup(mode, pool):
    "Shared 'towers' (an image projection and a word table) and each rank's inputs, all from one seed."
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, requires_grad=True)                  # image side
    E = torch.randn(len(VOCAB), 8, generator=g, requires_grad=True)        # text side: one row per word
    X = torch.randn(6, *((5,) if pool == 'patches' else ()), 8, generator=g)   # 3 images per rank (5 patches each)
    return A, E, X


def _noun_loss(A, E, X, nouns, mode, pool):
    words = sorted({w for ns in nouns for w in ns})
    img = F.normalize(X @ A, dim=-1)
    emb = F.normalize(E[[VOCAB.index(w) for w in words]], dim=-1) if words else E[:0]
    return multi_label_contrast_loss(img, nouns, emb, words, torch.tensor(10.), mode=mode, tau=0.2)


def _noun_worker(rank, world, init_file, mode, pool, out):
    _init(rank, world, init_file)
    A, E, X = _noun_setup(mode, pool)
    loss = _noun_loss(A, E, X[rank * 3:(rank + 1) * 3], NOUNS[rank], mode, pool)
    loss.backward()
    out[rank] = torch.cat([loss.detach().view(1), A.grad.flatten(), E.grad.flatten()])
    dist.destroy_process_group()


@pytest.mark.parametrize('mode,pool', [('soft', 'image'), ('any', 'patches')])
def test_noun_contrast_two_processes_equal_one_on_the_whole_batch(tmp_path, mode, pool):
    A, E, X = _noun_setup(mode, pool)
    n = 1 + A.numel() + E.numel()
    out = torch.zeros(2, n).share_memory_()
    mp.spawn(_noun_worker, args=(2, str(tmp_path / 'init'), mode, pool, out), nprocs=2, join=True)
    full = _noun_loss(A, E, X, NOUNS[0] + NOUNS[1], mode, pool)
    full.backward()
    ref = torch.cat([full.detach().view(1), A.grad.flatten(), E.grad.flatten()])
    assert torch.allclose(out[:, 0], ref[0].expand(2), atol=1e-6), (out[:, 0], ref[0])     # each rank: the global loss
    ddp_grad = out[:, 1:].mean(0)                                                        # what DDP's averaging gives
    err = float((ddp_grad - ref[1:]).abs().max() / ref[1:].abs().max())
    assert err < 1e-5, err


def _iic_setup():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 5, generator=g, requires_grad=True)       # a shared linear head: 6-d features -> K = 5
    Z1, Z2 = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g)
    Z2 = Z1 + 0.5 * Z2                                             # the second view: correlated with the first
    return W, Z1, Z2

SPLIT = [(0, 12), (12, 30)]      # unequal counts per rank (as after ranks drop different bad samples)


def _iic_worker(rank, world, init_file, out):
    _init(rank, world, init_file)
    W, Z1, Z2 = _iic_setup()
    a, b = SPLIT[rank]
    loss = iic_loss((Z1[a:b] @ W).softmax(-1), (Z2[a:b] @ W).softmax(-1), lamb=1.3)
    loss.backward()
    local = iic_loss((Z1[a:b] @ W).softmax(-1), (Z2[a:b] @ W).softmax(-1), lamb=1.3, gather=False)
    out[rank] = torch.cat([loss.detach().view(1), local.detach().view(1), W.grad.flatten()])
    dist.destroy_process_group()


def test_iic_two_processes_estimate_one_joint_distribution(tmp_path):
    W, Z1, Z2 = _iic_setup()
    out = torch.zeros(2, 2 + W.numel()).share_memory_()
    mp.spawn(_iic_worker, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    # the reference: IIC's IID_loss written out here on the concatenated batch
    p1, p2 = (Z1 @ W).softmax(-1), (Z2 @ W).softmax(-1)
    P = p1.T @ p2 / p1.shape[0]
    P = ((P + P.T) / 2).clamp_min(1e-8); P = P / P.sum()
    Pi, Pj = P.sum(1, keepdim=True).expand_as(P), P.sum(0, keepdim=True).expand_as(P)
    ref = -(P * (P.log() - 1.3 * Pi.log() - 1.3 * Pj.log())).sum()
    ref.backward()
    assert torch.allclose(out[:, 0], ref.detach().expand(2), atol=1e-6)
    err = float((out[:, 2:].mean(0) - W.grad.flatten()).abs().max() / W.grad.abs().max())
    assert err < 1e-5, err
    # gather=False: each rank's own estimate, which is not the global one
    assert (out[:, 1] - ref.detach()).abs().min() > 1e-3


# ---- the whole recipe through DDP ------------------------------------------------------------------------------
RECIPES = {
    # the demo's loss terms (nbs/experiments/train.ipynb's parameters), on the micro model
    'demo': dict(lambda_vision=0.0, lambda_cluster=1.0, cluster_detach=True, cluster_images=2, lambda_nouns=3.0,
                 noun_loss='soft', noun_parse='heads', noun_pool='patches', noun_bank=True, dense_features='value'),
    # the paper's three losses, the vision contrast with 2 local crops, IIC training the encoder too
    'paper': dict(lambda_vision=1.0, lambda_cluster=1.0, cluster_detach=False, cluster_images=0),
}
CAPTIONS = ['a red star and a ring', 'a box', 'two stars', 'a blue ring', 'a star on a box', 'a tree', 'rings', 'a red box']


def _model(recipe):
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=8, head_hidden=16, cluster_warmup=0, **RECIPES[recipe]))
    if m.cfg.lambda_nouns > 0: m.set_noun_vocab(['star', 'ring', 'box', 'tree', 'red', 'blue'])
    with torch.no_grad():     # randomise the GroupNorm/LayerNorm affine parameters and biases: a dropped term shows
        for name, p in m.named_parameters():
            if p.dim() == 1 and 'logit_scale' not in name: p.add_(0.3 * torch.randn_like(p))
        # the random micro model's patch tokens are alike (mean cosine 0.8), so the head would give every patch almost the
        # same assignment, IIC's gradient would be ~0 and only rounding would be compared: centre the head's first layer
        # on the mean token of the batch, so that the assignments differ between patches (as in a trained model)
        from vilseg.encoders import image_features
        z = F.normalize(image_features(m.clip, _batch()['global'])['patches'], dim=-1)   # the final tokens, which the head groups
        lin = m.head.net[0]
        lin.bias.copy_(-lin.weight @ z.reshape(-1, z.shape[-1]).mean(0))
    return m


def _batch(same_pair=False):
    "8 images' views and captions. `same_pair`: each paired view is the global view itself (full box, no flip), so that the\n    two views' assignments agree, IIC's mutual information is far from 0 and its gradient well conditioned."
    from torch.utils.data import default_collate
    from vilseg.views import MultiView, ViewConfig
    torch.manual_seed(5)
    mv = MultiView(ViewConfig(global_size=32, local_size=16, n_local=2))
    imgs = torch.randint(0, 255, (8, 3, 40, 40), dtype=torch.uint8)
    b = default_collate([mv(i) for i in imgs]); b['caption'] = list(CAPTIONS)
    if same_pair:
        b['pair'], b['pair_box'], b['pair_flip'] = b['global'].clone(), torch.tensor([[0., 0., 1., 1.]]).repeat(8, 1), torch.zeros(8, dtype=torch.bool)
    return b


def _take(batch, idx):
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in batch.items()}


def _recipe_worker(rank, world, init_file, recipe, path):
    _init(rank, world, init_file)
    torch.set_num_threads(1)
    m = _model(recipe)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    o = ddp(_take(_batch(True), list(range(rank * 4, rank * 4 + 4))), step=7)
    o['loss'].backward()
    torch.save({'loss': o['loss'].detach(), **{n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}},
               path.format(rank))
    dist.destroy_process_group()


@pytest.mark.parametrize('recipe', ['demo', 'paper'])
def test_recipe_gradients_two_processes_equal_one_on_the_whole_batch(tmp_path, recipe):
    mp.spawn(_recipe_worker, args=(2, str(tmp_path / 'init'), recipe, str(tmp_path / 'g{}.pt')), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f'g{r}.pt', weights_only=True) for r in range(2))
    # one process on the whole batch; with cluster_images=2 per rank, the head sees each rank's first 2 images, so the
    # single process gets them first (every loss term is invariant to the order of the batch)
    m = _model(recipe)
    order = [0, 1, 4, 5, 2, 3, 6, 7] if m.cfg.cluster_images else list(range(8))
    if m.cfg.cluster_images: m.cfg.cluster_images = 4
    o = m(_take(_batch(True), order), step=7)
    o['loss'].backward()
    ref = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(ref) == set(g0) - {'loss'}, set(ref) ^ (set(g0) - {'loss'})
    # the ranks' losses average to the single-process loss (the global terms are equal on each rank; the vision term is
    # each rank's share of the crops, and DDP averages it)
    assert torch.allclose((g0['loss'] + g1['loss']) / 2, o['loss'].detach(), atol=1e-5)
    # per parameter, the relative error of the gradient (float32 rounding: ~1e-5; per-rank estimates give ~0.1 to 1)
    errs = {n: float((g0[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-20)) for n in ref if ref[n].norm() > 0}
    assert torch.equal(torch.cat([g0[n].flatten() for n in ref]), torch.cat([g1[n].flatten() for n in ref])), 'DDP: the same gradient on both ranks'
    assert max(errs.values()) < 2e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:6]
    assert {'head.net.0.weight', 'clip.logit_scale'} <= set(ref)
    if recipe == 'demo': assert 'noun_bank.weight' in ref


# ---- BatchNorm statistics ------------------------------------------------------------------------------------------
def test_paired_and_local_views_leave_batchnorm_statistics_alone():
    from dataclasses import replace
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    torch.manual_seed(0)
    cfg = ViLSegConfig(model='vilseg-tiny', n_clusters=4, head_hidden=16, cluster_warmup=0, lambda_vision=1.0)
    m = ViLSeg(cfg).train()
    bns = [mod for mod in m.clip.visual.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns, 'vilseg-tiny has a BatchNorm stem'
    b = _batch(); b['global'] = F.interpolate(b['global'], size=64); b['pair'] = F.interpolate(b['pair'], size=64) * 3 + 1
    state0 = {k: v.clone() for k, v in m.state_dict().items()}

    def stats(model): return [torch.cat([x.running_mean, x.running_var, x.num_batches_tracked.view(1).float()])
                              for x in model.clip.visual.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    o = m(b, step=3)
    assert 'cluster' in o and 'vision' in o
    with_views = stats(m)
    # the reference: a forward of the global views alone (no paired, no local views) from the same state
    m.load_state_dict(state0)
    m(_take({k: v for k, v in b.items() if k not in ('pair', 'pair_box', 'pair_flip', 'local')}, list(range(8))), step=3)
    only_global = stats(m)
    assert all(torch.equal(a, c) for a, c in zip(with_views, only_global))
    # bn_stats='all': the views move the statistics (and add to the counts), the losses stay the same
    m_all = ViLSeg(replace(cfg, bn_stats='all')).train(); m_all.load_state_dict(state0)
    o_all = m_all(b, step=3)
    assert not all(torch.equal(a, c) for a, c in zip(stats(m_all), only_global))
    assert stats(m_all)[0][-1] == 1 + 1 + 1 + int(state0[[k for k in state0 if k.endswith('num_batches_tracked')][0]])
    for k in ('cross', 'cluster', 'vision'): assert torch.allclose(o[k], o_all[k], atol=1e-6), k
    with pytest.raises(ValueError, match='bn_stats'): ViLSeg(replace(cfg, bn_stats='pair'))


# ---- PAMR's placement --------------------------------------------------------------------------------------------------
def _pamr_reference(img, S, iters, dilations, tau=0.1):
    "PAMR from its equation (Araslanov & Roth 2020), written out pixel-offset by pixel-offset with explicit replicate padding."
    B, _, H, W = img.shape
    offs = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    ys, xs = torch.arange(H), torch.arange(W)
    def shifted(x, dy, dx): return x.index_select(-2, (ys + dy).clamp(0, H - 1)).index_select(-1, (xs + dx).clamp(0, W - 1))
    nb = torch.stack([shifted(img, dy, dx) for dy, dx in offs], 2)                           # B 3 N H W
    windows = torch.cat([nb, img[:, :, None].expand(-1, -1, len(dilations), -1, -1)], 2)     # 3x3 windows, centres in
    sd = windows.std(2, keepdim=True)
    kappa = -((nb - img[:, :, None]).abs() / (tau * sd + 1e-8)).mean(1)
    alpha = kappa.softmax(1)
    for _ in range(iters):
        S = sum(alpha[:, j, None] * shifted(S, dy, dx) for j, (dy, dx) in enumerate(offs))
    return S


@pytest.mark.parametrize('size', [(64, 64), (56, 72)])
def test_pamr_at_a_quarter_of_the_input_equals_the_reference(size):
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    from vilseg.encoders import image_features
    from vilseg.views import normalize
    torch.manual_seed(0)
    m = ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16, pamr_iters=4, pamr_dilations=(1, 2, 4))).eval()
    x = torch.randint(0, 255, (2, 3, *size), dtype=torch.uint8)
    names = ['star', 'ring', 'box']
    S = m.scores(x, names, method='dense', pamr_scale=0.25, out_size=(30, 40))
    # the reference: dense scores made at a quarter of the (patch-padded) input and cropped, the image resized to
    # that size (bilinear, align_corners=True), PAMR there, then upsampled to the output size
    xn = normalize(x)
    f = image_features(m.clip, xn, dense=m.cfg.dense_features)
    s = (F.normalize(f['patches'], dim=-1) @ m.class_embeddings(names).T).permute(0, 3, 1, 2)
    h, w = round(size[0] / 4), round(size[1] / 4)
    ph, pw = m.clip.visual.patch_size
    Hp, Wp = f['grid'][0] * ph, f['grid'][1] * pw
    s = F.interpolate(s, size=(max(h, round(Hp / 4)), max(w, round(Wp / 4))), mode='bilinear', align_corners=False)[..., :h, :w]
    im = F.interpolate(xn, size=(h, w), mode='bilinear', align_corners=True)
    ref = F.interpolate(_pamr_reference(im, s, 4, (1, 2, 4)), size=(30, 40), mode='bilinear', align_corners=False)
    assert torch.allclose(S, ref, atol=1e-5), float((S - ref).abs().max())
    # at scale 1 the same reference at the input size; and the quarter placement is not the full-size one
    S1 = m.scores(x, names, method='dense', pamr_scale=1.0)
    s1 = F.interpolate((F.normalize(f['patches'], dim=-1) @ m.class_embeddings(names).T).permute(0, 3, 1, 2), size=(Hp, Wp),
                       mode='bilinear', align_corners=False)[..., :size[0], :size[1]]
    assert torch.allclose(S1, _pamr_reference(xn, s1, 4, (1, 2, 4)), atol=1e-5)
    assert not torch.allclose(F.interpolate(S1, size=(30, 40), mode='bilinear', align_corners=False), S, atol=1e-3)
    # without PAMR the scale does nothing; a scale outside (0, 1] is refused
    assert torch.equal(m.scores(x, names, pamr_iters=0, pamr_scale=0.25), m.scores(x, names, pamr_iters=0))
    with pytest.raises(ValueError, match='pamr_scale'): m.scores(x, names, pamr_scale=0)
    with pytest.raises(ValueError, match='pamr_scale'): ViLSeg(ViLSegConfig(model='vilseg-micro', pamr_scale=1.5))
