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


def test_caption_parsing_edges_and_vocabulary_defaults():
    "Hyphenated heads give their last part (dropped when it is a stopword), one- and two-letter words, plural folding by 'es'."
    assert caption_words('a red ice-cream', 'heads') == ['cream']
    assert caption_words('a pick-up', 'heads') == []                       # 'up' is a stopword
    assert caption_words('letter b', 'heads') == [] and caption_words('an ox', 'heads') == ['ox']
    assert build_noun_vocab(['a box', 'two boxes'], min_count=1) == ['box']
    assert build_noun_vocab(['bo box'] * 3, min_count=1) == ['bo', 'box']   # no suffix: nothing to fold
    assert build_noun_vocab(['star'] * 20 + ['ring'] * 19) == ['star']       # min_count defaults to 20
    letters = 'abcdefghijklmnopqrtuvwxyz'                                    # no 's': no plural folding
    words = [f'q{letters[i // 25 % 25]}{letters[i % 25]}{letters[i // 625]}' for i in range(2001)]
    assert len(set(words)) == 2001
    assert len(build_noun_vocab([' '.join(words)] * 20)) == 2000             # max_size defaults to 2000
    assert build_noun_vocab(['a star ring', 'the ring'], min_count=1, stopwords={'star'}) == ['ring', 'the']   # its own stopwords
    assert caption_words('x marks the spot') == ['marks', 'spot']          # one-letter words are dropped
    assert NounExtractor(['red', 'star'], parse='heads')('a red star') == ['star']
    assert NounExtractor(['red', 'star'])('a red star') == ['red', 'star']


def test_loss_defaults_and_small_cases():
    "The documented defaults (temperatures 0.1, GroupViT's soft form, IIC with lamb 1 and gather on), two-noun banks, messages."
    z, t, s = unit(4, 7, 16), unit(4, 16), torch.tensor(6.0)
    assert torch.allclose(attentive_cross_modal_loss(z, t, s), attentive_cross_modal_loss(z, t, s, 0.1))
    assert not torch.allclose(attentive_cross_modal_loss(z, t, s), attentive_cross_modal_loss(z, t, s, 1.1))
    loc, tgt = unit(4, 2, 16), unit(4, 16)
    assert torch.allclose(vision_contrast_loss(loc, tgt), F.cross_entropy(loc.reshape(8, 16) @ tgt.T / 0.1, torch.arange(4).repeat_interleave(2)))
    img, emb = unit(4, 6, 16), unit(5, 16)
    words = WORDS + ['moon']                                                 # a prompt no caption names
    pos = torch.tensor([[w in n for w in words] for n in NOUNS])
    ref = multilabel_reference(s * (0.1 * (torch.logsumexp(img @ emb.T / 0.1, 1) - math.log(6))), pos, 'soft')
    assert torch.allclose(multi_label_contrast_loss(img, NOUNS, emb, words, s), ref, atol=1e-5)
    q1, q2 = torch.randn(30, 4, generator=G).softmax(-1), torch.randn(30, 4, generator=G).softmax(-1)
    assert torch.allclose(iic_loss(q1, q2), iic_loss(q1, q2, 1.0, 1e-8, True))
    p, b = unit(2, 12).requires_grad_(), unit(2, 12)
    assert torch.allclose(bank_distill_loss(p, b, s), infonce(s * p @ b.T), atol=1e-6) and float(bank_distill_loss(p, b, s)) > 0
    with pytest.raises(ValueError, match=r'^1 prompts for 2 embeddings$'): bank_distill_loss(p, b, s, prompts=['a'])


# ------------------------------------------------------------------------------------------------ two ranks, simulated
class TwoRanks:
    """A 2-rank world simulated in this process, so the losses' gather paths run where a mutation tool's forked runner
    sees them (the real 2-process checks are `test_ddp_exact.py`). This process is `rank`; each collective puts this
    rank's value at its place and the peer's next queued value (what the other rank would send) at the other.
    Replaced: `vilseg.losses._world`, `dist.all_gather_object`, `dist.all_gather`, `dist.all_reduce` and
    `torch.distributed.nn(.functional).all_gather` / `all_reduce` (with gradient to this rank's value)."""
    def __init__(self, monkeypatch, rank, peer):
        import torch.distributed as dist, torch.distributed.nn.functional as dnn
        import vilseg.losses as L
        self.rank, self.peer = rank, list(peer)
        monkeypatch.setattr(L, '_world', lambda: (rank, 2))
        monkeypatch.setattr(dist, 'all_gather_object', lambda out, obj: out.__setitem__(slice(None), self._place(obj)))
        monkeypatch.setattr(dist, 'all_gather', lambda xs, x: [o.copy_(v) for o, v in zip(xs, self._place(x))])
        monkeypatch.setattr(dist, 'all_reduce', lambda x, op=None: x.add_(self.peer.pop(0)))
        monkeypatch.setattr(dnn, 'all_gather', lambda x: tuple(self._place(x)))
        monkeypatch.setattr(torch.distributed.nn, 'all_gather', dnn.all_gather)     # open_clip's ClipLoss calls it here
        monkeypatch.setattr(dnn, 'all_reduce', lambda x: x + self.peer.pop(0))

    def _place(self, mine):
        other = self.peer.pop(0)
        if torch.is_tensor(mine): assert mine.shape == other.shape, f'all_gather needs one shape on every rank: {mine.shape} vs {other.shape}'
        return [mine, other] if self.rank == 0 else [other, mine]


@pytest.mark.parametrize('rank', [0, 1])
def test_gather_prompts_two_ranks_first_occurrence_padding_cut_and_gradient(monkeypatch, rank):
    w0, e0 = ['star', 'ring', 'tree'], unit(3, 8)
    w1, e1 = ['ring', 'moon'], unit(2, 8)
    mine_w, mine_e = (w0, e0) if rank == 0 else (w1, e1)
    peer_w, peer_e = (w1, e1) if rank == 0 else (w0, e0)
    pad = torch.full((3 - len(peer_e), 8), float('nan'))        # the peer pads to the longest rank; the rows must be cut off
    TwoRanks(monkeypatch, rank, [peer_w, torch.cat([peer_e, pad])])
    mine_e = mine_e.clone().requires_grad_()
    words, emb = gather_prompts(mine_w, mine_e)
    assert words == ['star', 'ring', 'tree', 'moon']             # rank order, each word at its first occurrence
    assert torch.equal(emb.detach(), torch.stack([e0[0], e0[1], e0[2], e1[1]]))
    emb.sum().backward()
    expect = torch.ones(3, 1) if rank == 0 else torch.tensor([[0.], [1.]])   # rank 1's 'ring' is a dropped copy
    assert torch.equal(mine_e.grad, expect.expand(-1, 8))


@pytest.mark.parametrize('rank', [0, 1])
def test_vision_contrast_two_ranks_labels_point_at_this_ranks_globals(monkeypatch, rank):
    loc, tgt, peer, tau = unit(3, 2, 8), unit(3, 8), unit(3, 8), 0.2
    TwoRanks(monkeypatch, rank, [peer])
    allt = torch.cat([tgt, peer]) if rank == 0 else torch.cat([peer, tgt])
    ref = F.cross_entropy(loc.reshape(6, 8) @ allt.T / tau, (torch.arange(3) + 3 * rank).repeat_interleave(2))
    assert torch.allclose(vision_contrast_loss(loc, tgt, tau), ref, atol=1e-6)


def test_iic_two_ranks_is_the_loss_of_the_joint_batch(monkeypatch):
    q = [torch.randn(n, 5, generator=G).mul(2).softmax(-1) for n in (9, 9, 14, 14)]     # rank 0's q1, q2; the peer's q1, q2
    TwoRanks(monkeypatch, 0, [q[2].T @ q[3], torch.tensor(14.)])
    ref = iic_loss(torch.cat([q[0], q[2]]), torch.cat([q[1], q[3]]), gather=False)
    assert torch.allclose(iic_loss(q[0], q[1]), ref, atol=1e-6)
    assert not torch.allclose(iic_loss(q[0], q[1], gather=False), ref, atol=1e-3)       # gather=False: this rank alone


@pytest.mark.parametrize('rank', [0, 1])
def test_cross_modal_losses_two_ranks_use_the_global_batch(monkeypatch, rank):
    img, txt, pimg, ptxt, s = unit(3, 8), unit(3, 8), unit(3, 8), unit(3, 8), torch.tensor(4.2)
    cat = (lambda a, b: torch.cat([a, b])) if rank == 0 else (lambda a, b: torch.cat([b, a]))
    TwoRanks(monkeypatch, rank, [pimg, ptxt])
    assert torch.allclose(cross_modal_loss(img, txt, s), infonce(s * cat(img, pimg) @ cat(txt, ptxt).T), atol=1e-6)
    z, pz = unit(3, 5, 8), unit(3, 5, 8)
    TwoRanks(monkeypatch, rank, [pz, ptxt])
    Z, T = cat(z, pz), cat(txt, ptxt)
    a = torch.einsum('ind,jd->ijn', Z, T).div(0.1).softmax(-1)
    ref = infonce(s * torch.einsum('ijd,jd->ij', F.normalize(torch.einsum('ijn,ind->ijd', a, Z), dim=-1), T))
    assert torch.allclose(attentive_cross_modal_loss(z, txt, s), ref, atol=1e-6)


@pytest.mark.parametrize('mode', ['soft', 'any'])
def test_multi_label_contrast_two_ranks_is_the_loss_of_the_joint_batch(monkeypatch, mode):
    s = torch.tensor(5.5)
    n0, w0 = [['star', 'red'], ['ring'], []], ['star', 'red', 'ring']      # equal batches on the ranks, as training trims them
    n1, w1 = [['ring', 'box'], [], ['star']], ['ring', 'box', 'star']
    emb = {w: unit(8) for w in ('star', 'red', 'ring', 'box')}            # one embedding per word, as on every rank
    img0, img1 = unit(3, 8), unit(3, 8)
    p1 = torch.stack([emb[w] for w in w1])
    TwoRanks(monkeypatch, 0, [w1, p1, img1, [list(n) for n in n1]])
    got = multi_label_contrast_loss(img0, n0, torch.stack([emb[w] for w in w0]), w0, s, mode=mode)
    words = ['star', 'red', 'ring', 'box']
    pos = torch.tensor([[w in n for w in words] for n in n0 + n1])
    ref = multilabel_reference(s * torch.cat([img0, img1]) @ torch.stack([emb[w] for w in words]).T, pos, mode)
    assert torch.allclose(got, ref, atol=1e-5)


def test_bank_distill_two_ranks_over_the_distinct_nouns(monkeypatch):
    s = torch.tensor(8.0)
    p = {w: unit(8) for w in 'abcd'}; b = {w: unit(8) for w in 'abcd'}
    mine, peer = ['a', 'b'], ['b', 'c', 'd']
    st = lambda d, ws: torch.stack([d[w] for w in ws])
    pad = lambda x: torch.cat([x, torch.zeros(3 - len(x), 8)])
    TwoRanks(monkeypatch, 1, [mine, pad(st(p, mine)), mine, pad(st(b, mine))])   # this process is rank 1, holding `peer`
    got = bank_distill_loss(st(p, peer), st(b, peer), s, prompts=peer)
    assert torch.allclose(got, infonce(s * st(p, 'abcd') @ st(b, 'abcd').T), atol=1e-5)
