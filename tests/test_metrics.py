"""ConfusionMatrix against hand-made cases and an independent naive numpy computation (mmsegmentation's convention)."""
import math

import numpy as np
import pytest
import torch

from vilseg.metrics import ConfusionMatrix, hiou, per_class_table


def naive_scores(preds, gts, num_classes, ignore_index=255):
    """Written independently of vilseg: per-class loops over flattened numpy arrays, like mmseg's
    intersect_and_union + total_area_to_metrics (predictions outside [0, C) hit no class)."""
    p = np.concatenate([np.asarray(x).reshape(-1) for x in preds])
    g = np.concatenate([np.asarray(x).reshape(-1) for x in gts])
    valid = g != ignore_index
    p, g = p[valid], g[valid]
    inter, area_p, area_g = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for c in range(num_classes):
        inter[c] = np.sum((p == c) & (g == c))
        area_p[c] = np.sum(p == c)
        area_g[c] = np.sum(g == c)
    union = area_p + area_g - inter
    iou = np.array([inter[c] / union[c] if union[c] > 0 else np.nan for c in range(num_classes)])
    acc = np.array([inter[c] / area_g[c] if area_g[c] > 0 else np.nan for c in range(num_classes)])
    present = [c for c in range(num_classes) if union[c] > 0]
    miou = sum(iou[c] for c in present) / len(present)
    with_gt = [c for c in range(num_classes) if area_g[c] > 0]
    macc = sum(acc[c] for c in with_gt) / len(with_gt)
    return dict(iou=iou, acc=acc, miou=miou, macc=macc, aacc=inter.sum() / area_g.sum(), gt=area_g)


def _random_split(seed, n=6, C=7, hw=(23, 31), p_ignore=0.15, p_invalid=0.0):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n):
        g = rng.integers(0, C - 1, hw)                    # class C-1 never in GT: predicted-only class
        g[rng.random(hw) < p_ignore] = 255
        p = np.where(rng.random(hw) < 0.6, g, rng.integers(0, C, hw))
        p[g == 255] = rng.integers(0, C, hw)[g == 255]
        p = np.where(p == 255, 0, p)
        if p_invalid: p[rng.random(hw) < p_invalid] = 255
        gts.append(g); preds.append(p)
    return preds, gts


def _check(r, ref):
    np.testing.assert_allclose(r['iou'], ref['iou'], equal_nan=True)
    np.testing.assert_allclose(r['acc'], ref['acc'], equal_nan=True)
    for k in ('miou', 'macc', 'aacc'): assert math.isclose(r[k], ref[k], rel_tol=1e-12), k
    assert r['gt_pixels'].tolist() == ref['gt'].astype(int).tolist()


def test_perfect_prediction():
    g = torch.randint(0, 3, (2, 8, 8))
    r = ConfusionMatrix(3).update(g, g).compute()
    assert r['miou'] == r['macc'] == r['aacc'] == 1.0


def test_absent_class_excluded_from_mean():
    g = torch.tensor([[0, 0, 1, 1]])
    p = torch.tensor([[0, 1, 1, 1]])
    r = ConfusionMatrix(5).update(p, g).compute()
    assert np.isnan(r['iou'][2:]).all()
    assert math.isclose(r['miou'], (1 / 2 + 2 / 3) / 2)                 # over classes 0 and 1 only


def test_all_ignore_changes_nothing():
    g = torch.tensor([[0, 1], [1, 1]]); p = torch.tensor([[0, 1], [0, 1]])
    cm = ConfusionMatrix(3).update(p, g)
    r1 = cm.compute()
    cm.update(torch.randint(0, 3, (4, 4)), torch.full((4, 4), 255))
    r2 = cm.compute()
    np.testing.assert_array_equal(r1['iou'], r2['iou'])
    assert r1['miou'] == r2['miou'] and r1['aacc'] == r2['aacc']


def test_predicted_but_absent_class_counts_with_zero():
    g = torch.tensor([0, 0, 0, 0]); p = torch.tensor([0, 0, 0, 2])
    r = ConfusionMatrix(3).update(p, g).compute()
    assert r['iou'][2] == 0.0 and np.isnan(r['iou'][1])
    assert math.isclose(r['miou'], (3 / 4 + 0) / 2)
    assert np.isnan(r['acc'][2]) and r['macc'] == 3 / 4


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_agrees_with_naive(seed):
    preds, gts = _random_split(seed)
    cm = ConfusionMatrix(7)
    for p, g in zip(preds, gts): cm.update(torch.from_numpy(p), torch.from_numpy(g))
    r = cm.compute()
    ref = naive_scores(preds, gts, 7)
    _check(r, ref)
    assert r['iou'][6] == 0.0                                       # predicted-only class counts as 0


def test_agrees_with_naive_invalid_predictions():
    preds, gts = _random_split(3, p_invalid=0.05)
    assert any((p == 255).any() for p in preds)
    cm = ConfusionMatrix(7)
    for p, g in zip(preds, gts): cm.update(p, g)                    # numpy arrays are accepted too
    _check(cm.compute(), naive_scores(preds, gts, 7))


def test_merge_of_halves_equals_whole():
    preds, gts = _random_split(4, n=8)
    whole, a, b = ConfusionMatrix(7), ConfusionMatrix(7), ConfusionMatrix(7)
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.update(p, g); (a if i < 4 else b).update(p, g)
    a.merge(b)
    assert torch.equal(a.mat, whole.mat) and torch.equal(a.invalid, whole.invalid)
    _check(a.compute(), naive_scores(preds, gts, 7))


def test_state_dict_roundtrip_and_reset():
    preds, gts = _random_split(5)
    cm = ConfusionMatrix(7)
    for p, g in zip(preds, gts): cm.update(p, g)
    c2 = ConfusionMatrix(7).load_state_dict(cm.state_dict())
    assert torch.equal(c2.mat, cm.mat)
    with pytest.raises(ValueError): ConfusionMatrix(6).load_state_dict(cm.state_dict())
    assert cm.reset().mat.sum() == 0 and cm.all_reduce().mat.sum() == 0


def test_hiou_by_hand():
    # GT [0,1,1,2,3], pred [0,1,2,3,3]: IoU = (1, 1/2, 0, 1/2); seen {0,1}: S = 3/4; unseen {2,3}: U = 1/4
    g = torch.tensor([0, 1, 1, 2, 3]); p = torch.tensor([0, 1, 2, 3, 3])
    r = ConfusionMatrix(4, seen=[0, 1], unseen=[2, 3]).update(p, g).compute()
    np.testing.assert_allclose(r['iou'], [1, 0.5, 0, 0.5])
    assert math.isclose(r['miou_seen'], 0.75) and math.isclose(r['miou_unseen'], 0.25)
    assert math.isclose(r['hiou'], 2 * 0.75 * 0.25 / 1.0)
    # unseen all wrong and seen all wrong: S + U = 0 -> 0
    r0 = ConfusionMatrix(2).update(torch.tensor([1, 0]), torch.tensor([0, 1])).compute(seen=[0], unseen=[1])
    assert r0['miou_seen'] == 0 and r0['miou_unseen'] == 0 and r0['hiou'] == 0.0
    assert hiou(0.6, 0.2) == pytest.approx(0.3)


def test_errors():
    with pytest.raises(ValueError, match='shape'): ConfusionMatrix(3).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='outside'): ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(TypeError): ConfusionMatrix(3).update(torch.rand(4), torch.zeros(4, dtype=torch.long))


def test_per_class_table():
    g = torch.tensor([0, 0, 1]); p = torch.tensor([0, 1, 1])
    t = per_class_table(ConfusionMatrix(3).update(p, g).compute(), ['sky', 'cow', 'tree'])
    assert list(t.columns) == ['class', 'iou', 'acc', 'gt_pixels']
    assert t['class'].tolist() == ['sky', 'cow', 'tree'] and t.gt_pixels.tolist() == [2, 1, 0]
    assert t.iou.tolist()[:2] == [0.5, 0.5] and np.isnan(t.iou[2])
    with pytest.raises(ValueError): per_class_table(ConfusionMatrix(3).compute(), ['a'])
