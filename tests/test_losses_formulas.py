"""Each loss of `vilseg.losses` (nbs/06_losses) on one process against its formula written out here, with random
embeddings, scales and temperatures so a dropped term shows: open_clip `loss.py` `ClipLoss` (symmetric InfoNCE), PACL's
caption-conditioned pooling, the vision contrast (crops vs the batch's detached globals), IIC's `IID_loss`
(xu-ji/IIC `code/utils/cluster/IID_losses.py`), GroupViT's multi-label contrast (`models/multi_label_contrastive.py`,
soft targets) and its one-positive-suffices variant, the log-sum-exp patch pooling, the noun-bank distillation, and the
caption parsing into nouns."""
import math

import pytest
import torch
import torch.nn.functional as F

from vilseg.losses import (cross_modal_loss, attentive_cross_modal_loss, vision_contrast_loss, iic_loss, lse_pool,
                           multi_label_contrast_loss, bank_distill_loss, gather_prompts, caption_words, build_noun_vocab,
                           NounExtractor)

G = torch.Generator().manual_seed(0)
def unit(*shape): return F.normalize(torch.randn(*shape, generator=G), dim=-1)


def infonce(logits):
    lab = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2


def test_cross_modal_is_symmetric_infonce():
    img, txt, s = unit(7, 16), unit(7, 16), torch.tensor(7.3)
    assert torch.allclose(cross_modal_loss(img, txt, s), infonce(s * img @ txt.T), atol=1e-6)
    # one direction only would differ
    assert not torch.allclose(cross_modal_loss(img, txt, s), F.cross_entropy(s * img @ txt.T, torch.arange(7)), atol=1e-4)


def test_attentive_cross_modal_pools_patches_by_the_caption():
    z, t, s, tau = unit(5, 9, 16), unit(5, 16), torch.tensor(6.1), 0.37
    a = torch.einsum('ind,jd->ijn', z, t).div(tau).softmax(-1)
    g = F.normalize(torch.einsum('ijn,ind->ijd', a, z), dim=-1)
    ref = infonce(s * torch.einsum('ijd,jd->ij', g, t))
    assert torch.allclose(attentive_cross_modal_loss(z, t, s, tau), ref, atol=1e-6)


def test_vision_contrast_against_the_detached_globals():
    loc, tgt, tau = unit(4, 3, 16), unit(4, 16).requires_grad_(), 0.23
    loc.requires_grad_()
    l = vision_contrast_loss(loc, tgt, tau)
    ref = F.cross_entropy(loc.reshape(12, 16) @ tgt.detach().T / tau, torch.arange(4).repeat_interleave(3))
    assert torch.allclose(l, ref, atol=1e-6)
    l.backward()
    assert tgt.grad is None and loc.grad.abs().sum() > 0, 'the targets are stop-gradient'


@pytest.mark.parametrize('lamb', [1.0, 1.7])
def test_iic_against_iid_loss(lamb):
    q1, q2 = torch.randn(40, 6, generator=G).mul(2).softmax(-1), torch.randn(40, 6, generator=G).mul(2).softmax(-1)
    P = q1.T @ q2 / 40
    P = ((P + P.T) / 2).clamp_min(1e-8); P = P / P.sum()
    Pi, Pj = P.sum(1, keepdim=True).expand(6, 6), P.sum(0, keepdim=True).expand(6, 6)
    ref = -(P * (P.log() - lamb * Pi.log() - lamb * Pj.log())).sum()
    assert torch.allclose(iic_loss(q1, q2, lamb), ref, atol=1e-6)
    assert torch.allclose(iic_loss(q1.view(4, 10, 6), q2.view(4, 10, 6), lamb), ref, atol=1e-6)   # any leading shape
    assert torch.allclose(iic_loss(q1, q2, lamb, gather=False), ref, atol=1e-6)
    K = 6; one = F.one_hot(torch.arange(60) % K, K).float()
    assert abs(float(iic_loss(one, one)) + math.log(K)) < 1e-4            # the optimum, -log K


def test_lse_pool_between_mean_and_max():
    sim = torch.randn(3, 11, 4, generator=G)
    for tau in (0.05, 0.5, 5.0):
        ref = tau * torch.log(torch.exp(sim / tau).mean(1))
        assert torch.allclose(lse_pool(sim, tau), ref, atol=1e-5)
    assert torch.allclose(lse_pool(sim, 1e-3), sim.max(1).values, atol=5e-3)
    assert torch.allclose(lse_pool(sim, 1e3), sim.mean(1), atol=5e-3)
    with pytest.raises(ValueError, match='tau'): lse_pool(sim, 0)


NOUNS = [['star', 'red'], ['ring'], [], ['box', 'star']]
WORDS = ['box', 'red', 'ring', 'star']


def multilabel_reference(logits, pos, mode):
    rows, cols = pos.any(1), pos.any(0)
    if mode == 'soft':
        w = pos.float()
        li = -((logits.log_softmax(1) * w).sum(1)[rows] / w.sum(1)[rows]).mean()
        lt = -((logits.T.log_softmax(1) * w.T).sum(1)[cols] / w.sum(0)[cols]).mean()
    else:
        li = torch.stack([-(torch.logsumexp(logits[i][pos[i]], 0) - torch.logsumexp(logits[i], 0)) for i in range(len(pos)) if rows[i]]).mean()
        lt = torch.stack([-(torch.logsumexp(logits[:, u][pos[:, u]], 0) - torch.logsumexp(logits[:, u], 0)) for u in range(pos.shape[1]) if cols[u]]).mean()
    return (li + lt) / 2


@pytest.mark.parametrize('mode', ['soft', 'any'])
@pytest.mark.parametrize('patches', [False, True])
def test_multi_label_contrast_against_its_formula(mode, patches):
    emb, s, tau = unit(4, 16), torch.tensor(5.5), 0.3
    img = unit(4, 6, 16) if patches else unit(4, 16)
    pos = torch.tensor([[w in n for w in WORDS] for n in NOUNS])
    sim = img @ emb.T
    logits = s * (tau * (torch.logsumexp(sim / tau, 1) - math.log(6)) if patches else sim)
    ref = multilabel_reference(logits, pos, mode)
    assert torch.allclose(multi_label_contrast_loss(img, NOUNS, emb, WORDS, s, mode=mode, tau=tau), ref, atol=1e-5)


def test_multi_label_contrast_edge_cases():
    img, emb = unit(3, 8).requires_grad_(), unit(2, 8).requires_grad_()
    zero = multi_label_contrast_loss(img, [[], [], []], emb, ['a', 'b'], torch.tensor(5.))
    assert float(zero.detach()) == 0 and zero.requires_grad                     # no caption has a noun: 0, with a graph
    with pytest.raises(ValueError, match='mode'): multi_label_contrast_loss(img, [[]] * 3, emb, ['a', 'b'], torch.tensor(5.), mode='all')
    with pytest.raises(ValueError, match='BxD'): multi_label_contrast_loss(img[0], [[]], emb, ['a', 'b'], torch.tensor(5.))
    with pytest.raises(ValueError, match='distinct'): gather_prompts(['a', 'a'], unit(2, 8))
    w, e = gather_prompts(['a', 'b'], emb)                             # one process: as given
    assert w == ['a', 'b'] and e is emb


def test_bank_distill_is_infonce_with_the_bank_detached():
    p, b, s = unit(5, 12).requires_grad_(), unit(5, 12).requires_grad_(), torch.tensor(9.0)
    l = bank_distill_loss(p, b, s, prompts=list('abcde'))
    assert torch.allclose(l, infonce(s * p @ b.T), atol=1e-5)
    l.backward()
    assert p.grad.abs().sum() > 0 and b.grad is None
    one = bank_distill_loss(p[:1], b[:1], s)
    assert float(one.detach()) == 0 and one.requires_grad
    with pytest.raises(ValueError, match='shape'): bank_distill_loss(p, b[:4], s)
    with pytest.raises(ValueError, match='prompts'): bank_distill_loss(p, b, s, prompts=['a'])


def test_caption_parsing():
    assert caption_words('A red star and two rings next to a box.') == ['red', 'star', 'rings', 'box']
    assert caption_words('a mid-size red plus sign', 'heads') == ['sign']
    assert caption_words('hexagon, black block', 'heads') == ['hexagon', 'block']
    assert caption_words('the big red star', 'heads') == ['star']
    with pytest.raises(ValueError, match='parse'): caption_words('a star', 'nouns')
    caps = ['a star', 'two stars', 'a star and a ring', 'rings', 'a box'] * 2
    assert build_noun_vocab(caps, min_count=4) == ['star', 'ring']            # plurals folded; 'box' below min_count
    assert build_noun_vocab(caps, min_count=2, max_size=1) == ['star']
    ne = NounExtractor(['star', 'ring', 'box'])
    assert ne('two rings, a star and another star') == ['ring', 'star'] and ne('boxes') == ['box'] and ne('a tree') == []
    with pytest.raises(ValueError, match='parse'): NounExtractor(['star'], parse='all')
