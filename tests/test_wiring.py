"""The wiring of evaluation and training, each against an expectation computed independently in the test (issue 26).

Every test here was checked against a plausible single-line bug put into a copy of the package (see the report of
issue 26 and `tests/mutants/`): sliding-window placement and stitching, background-threshold calibration, seen/unseen
through `evaluate()` and `run_protocol()`, the correspondence between the two views fed to the clustering loss, the
stop-gradient of the vision-contrast targets, the EMA teacher, the counting of skipped samples during training,
atomic writes under a crash, the resumed RNG state, the confusion matrix reduced over a 2-process gloo group, and
one cheap learning test.
"""
import json, math, os, random, shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from vilseg.evaluate import evaluate, calibrate_threshold, slide_scores


# ------------------------------------------------------------------------------------------------ hand references
def hand_iou(pred: np.ndarray, lab: np.ndarray, C: int, ignore: int = 255) -> np.ndarray:
    "Per-class IoU = TP / (TP + FP + FN) over pixels whose label is not `ignore`; NaN where the union is empty."
    keep = lab != ignore
    p, l = pred[keep], lab[keep]
    out = np.full(C, np.nan)
    for c in range(C):
        tp = np.sum((p == c) & (l == c)); union = np.sum((p == c) | (l == c))
        if union: out[c] = tp / union
    return out


def nanmean(x):
    x = np.asarray(x, float); x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float('nan')


class Items:
    "A dense-label split held in memory: items with uint8 `image` (3xHxW) and long `label` (HxW)."
    def __init__(self, images, labels, class_names):
        self.images, self.labels, self.class_names = images, labels, class_names
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return dict(image=self.images[i], label=self.labels[i])


# ------------------------------------------------------------------------------------------------ sliding windows
def f_abs(k, x, y, H, W):
    "The position-dependent part of the smooth oracle's score of foreground class k (never saturates)."
    return (0.25 + 0.5 * x / (W - 1) - 0.1 * y / (H - 1)) if k == 0 else (0.75 - 0.5 * x / (W - 1) + 0.2 * y / (H - 1))


def f_loc(k, i, j, h, w):
    "The part that depends on the pixel's place inside the window: overlapping windows disagree."
    return (0.15 * j / max(w - 1, 1) - 0.1 * i / max(h - 1, 1)) if k == 0 else (-0.15 * j / max(w - 1, 1) + 0.12 * i / max(h - 1, 1))


class CoordOracle(torch.nn.Module):
    """Reads each pixel's absolute (x, y) from channels 0 and 1 of the uint8 image and scores the two foreground
    classes f_abs + f_loc (smooth, about 0.1-1.0); records the window (y0, x0, h, w) of each call."""
    def __init__(self, H, W):
        super().__init__(); self.H, self.W, self.calls = H, W, []
        self.clip = SimpleNamespace(logit_scale=torch.tensor(math.log(10.0)))

    def scores(self, images, class_names, **kw):
        assert images.dtype == torch.uint8 and len(class_names) == 2
        x, y = images[:, 0].double(), images[:, 1].double()
        h, w = images.shape[-2:]
        i = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
        j = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
        self.calls.append((int(images[0, 1, 0, 0]), int(images[0, 0, 0, 0]), h, w))
        return torch.stack([f_abs(k, x, y, self.H, self.W) + f_loc(k, i, j, h, w) for k in range(2)], 1).float()


def coord_image(H, W):
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    img[0] = torch.arange(W).view(1, W); img[1] = torch.arange(H).view(H, 1); img[2] = 7
    return img


def hand_slide(H, W, windows, wh, ww):
    "Average, over the hand-placed windows covering each pixel, of the oracle's scores in that window."
    acc, cnt = np.zeros((2, H, W)), np.zeros((H, W))
    for y0, x0 in windows:
        for i in range(wh):
            for j in range(ww):
                for k in range(2): acc[k, y0 + i, x0 + j] += f_abs(k, x0 + j, y0 + i, H, W) + f_loc(k, i, j, wh, ww)
                cnt[y0 + i, x0 + j] += 1
    assert cnt.min() >= 1
    return acc / cnt


# window 12, stride 5: origins every 5 pixels, and a last window flush with the far edge when the grid falls short
#   H=20: 0, 5 (5+12=17 < 20) -> 8 ; W=27: 0, 5, 10, 15 (15+12=27, flush already) ; W=29: 0, 5, 10, 15 -> 17 ;
#   H=10 < 12: one window of height 10
SLIDE_CASES = {(20, 27): ([0, 5, 8], [0, 5, 10, 15], 12, 12), (10, 29): ([0], [0, 5, 10, 15, 17], 10, 12)}


@pytest.mark.parametrize('hw', sorted(SLIDE_CASES))
def test_slide_scores_places_windows_and_averages_overlaps(hw):
    """`slide_scores` against hand-placed windows and the hand-computed per-pixel mean over the windows covering
    each pixel (mmseg's `slide_inference`: sum of the window logits / count of windows)."""
    H, W = hw
    ys, xs, wh, ww = SLIDE_CASES[hw]
    m = CoordOracle(H, W)
    img = coord_image(H, W)
    S = slide_scores(m, torch.stack([img, img]), [['a'], ['b']], window=12, stride=5)
    assert sorted(set(m.calls)) == sorted((y, x, wh, ww) for y in ys for x in xs) and len(m.calls) == len(ys) * len(xs)
    want = hand_slide(H, W, [(y, x) for y in ys for x in xs], wh, ww)
    assert S.shape == (2, 2, H, W)
    np.testing.assert_allclose(S[0].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(S[1].numpy(), want, atol=1e-5)


def test_evaluate_sliding_window_threshold_sweep_matches_hand_average():
    """`evaluate(window=12, stride=5)` with a cosine background threshold: the predicted map is the argmax of the
    hand-averaged foreground scores, background where the best one is below the threshold; per-class IoU and the
    sweep's mIoU against `hand_iou` on that map (mmseg's IoU = TP/(TP+FP+FN), NaN classes left out of the mean)."""
    H, W = 20, 27
    ys, xs, wh, ww = SLIDE_CASES[(H, W)]
    avg = hand_slide(H, W, [(y, x) for y in ys for x in xs], wh, ww)
    best, arg = avg.max(0), avg.argmax(0) + 1

    def pred_at(t): return np.where(best < t, 0, arg)

    lab = pred_at(0.62).copy()                                  # the truth: the averaged map at 0.62, with some noise
    lab[3, :6] = 1; lab[15, 20:] = 2; lab[:, 26] = 255
    ds = Items([coord_image(H, W)] * 2, [torch.as_tensor(lab)] * 2, [['background'], ['a'], ['b']])
    ths = [0.5, 0.62, 0.7]
    r = evaluate(CoordOracle(H, W), ds, bg_index=0, bg_threshold=0.62, thresholds=ths, window=12, stride=5,
                 batch_size=2, progress=False)
    want = {t: hand_iou(np.concatenate([pred_at(t)] * 2), np.concatenate([lab] * 2), 3) for t in ths}
    np.testing.assert_allclose(r['iou'], want[0.62], atol=1e-12)
    assert r['sweep'].keys() == set(ths)
    for t in ths: assert r['sweep'][t] == pytest.approx(nanmean(want[t]), abs=1e-12), t
    assert len({round(nanmean(w), 6) for w in want.values()}) == 3, 'the sweep must tell the thresholds apart'


# ------------------------------------------------------------------------------------------------ calibration
class PositionOracle(torch.nn.Module):
    "Whole-image scores from the pixel position only: a fixed smooth function per class (no window, any content)."
    def __init__(self, fn, logit_scale=10.0):
        super().__init__(); self.fn = fn
        self.clip = SimpleNamespace(logit_scale=torch.tensor(math.log(logit_scale)))

    def scores(self, images, class_names, **kw):
        B, _, H, W = images.shape
        yy, xx = np.mgrid[0:H, 0:W]
        s = np.stack([self.fn(k, yy, xx, H, W) for k in range(len(class_names))])
        return torch.as_tensor(s, dtype=torch.float32)[None].expand(B, -1, -1, -1).clone()


def smooth3(k, yy, xx, H, W):
    "Three foreground scores spread over roughly -0.1..0.9 across the image."
    u, v = xx / (W - 1), yy / (H - 1)
    return [0.8 * u * (1 - 0.5 * v) + 0.0173, 0.7 * (1 - u) * v + 0.1131, 0.9 * np.sin(np.pi * u) * np.sin(np.pi * v) - 0.1071][k]


def hand_pred(fn, H, W, C_fg, t, bg_score='cosine', scale=1.0):
    "argmax over the foreground scores (+1: class 0 is background); background where the best cosine (or softmax prob at `scale`) < t."
    yy, xx = np.mgrid[0:H, 0:W]
    s = np.stack([fn(k, yy, xx, H, W) for k in range(C_fg)]).astype(np.float32).astype(np.float64)
    if bg_score == 'prob':
        e = np.exp(scale * s - (scale * s).max(0)); s = e / e.sum(0)
    assert np.abs(s.max(0) - t).min() > 1e-6, 'no score on the threshold itself (float32 vs float64 comparison)'
    return np.where(s.max(0) < t, 0, s.argmax(0) + 1)


@pytest.mark.parametrize('bg_score', ['cosine', 'prob'])
def test_calibrate_threshold_on_known_sweep(bg_score):
    """`calibrate_threshold` returns the threshold of the largest mIoU of a sweep, each entry of which is the hand
    mIoU of the map thresholded at t (cosine score, or the softmax over foreground classes at `prob_scale`, as
    MaskCLIP/SCLIP evaluate)."""
    H, W = 18, 22
    names = [['background'], ['a'], ['b'], ['c']]
    ths = [0.103, 0.253, 0.403, 0.553, 0.703] if bg_score == 'cosine' else [0.343, 0.453, 0.553, 0.653, 0.803]
    t_true = ths[2]
    lab = hand_pred(smooth3, H, W, 3, t_true, bg_score, 10.0)
    assert len(np.unique(lab)) == 4
    lab2 = lab.copy(); lab2[::3, ::4] = 255; lab2[5, :] = 2            # a second image: some ignored pixels and noise
    ds = Items([torch.zeros(3, H, W, dtype=torch.uint8)] * 2, [torch.as_tensor(lab), torch.as_tensor(lab2)], names)
    oracle = PositionOracle(smooth3, logit_scale=50.0)       # prob_scale=10 given: the model's own scale is not used
    best, sweep = calibrate_threshold(oracle, ds, thresholds=ths, bg_score=bg_score, prob_scale=10.0, progress=False)
    want = {t: nanmean(hand_iou(np.concatenate([hand_pred(smooth3, H, W, 3, t, bg_score, 10.0)] * 2),
                                np.concatenate([lab, lab2]), 4)) for t in ths}
    assert set(sweep) == set(want)
    for t in want: assert sweep[t] == pytest.approx(want[t], abs=1e-9), (t, sweep, want)
    assert best == max(want, key=want.get) == t_true
    assert sorted(want.values())[-1] - sorted(want.values())[-2] > 0.02, 'a clear winner'
    # the model's own logit scale when prob_scale is None (here 10): the same sweep
    if bg_score == 'prob':
        assert calibrate_threshold(PositionOracle(smooth3, logit_scale=10.0), ds, thresholds=ths, bg_score='prob',
                                   progress=False) == (best, sweep)


def test_calibrate_threshold_picks_from_given_thresholds():
    """`calibrate_threshold(thresholds=ths)` returns one of `ths`: labels without background (the map at threshold
    -1), so the lower the threshold the better; 0.0 would beat both thresholds given, 0.403 and 0.553."""
    H, W = 18, 22
    lab = hand_pred(smooth3, H, W, 3, -1.0)
    ds = Items([torch.zeros(3, H, W, dtype=torch.uint8)], [torch.as_tensor(lab)], [['background'], ['a'], ['b'], ['c']])
    best, sweep = calibrate_threshold(PositionOracle(smooth3), ds, thresholds=[0.403, 0.553], progress=False)
    assert best in (0.403, 0.553) and set(sweep) == {0.403, 0.553}


# ------------------------------------------------------------------------------------------------ seen / unseen
SEEN, UNSEEN = [1, 2], [3]


def _seen_unseen_expect(labs, preds):
    iou = hand_iou(np.concatenate(preds), np.concatenate(labs), 4)
    s, u = nanmean(iou[SEEN]), nanmean(iou[UNSEEN])
    return iou, s, u, 2 * s * u / (s + u)                    # hIoU: harmonic mean of seen and unseen mIoU


def test_evaluate_seen_unseen_hand_case():
    """Seen/unseen mIoU and hIoU = 2SU/(S+U) (the zero-shot segmentation convention) through `evaluate()`, against
    the hand per-class IoU of the hand-predicted map."""
    H, W = 18, 22
    pred = hand_pred(smooth3, H, W, 3, 0.4)
    lab = pred.copy(); xx = np.arange(W)[None].repeat(H, 0)
    lab[(pred == 3) & (xx % 2 == 0)] = 0; lab[0] = 255       # the unseen class half wrong, the seen ones right
    ds = Items([torch.zeros(3, H, W, dtype=torch.uint8)], [torch.as_tensor(lab)], [['background'], ['a'], ['b'], ['c']])
    r = evaluate(PositionOracle(smooth3), ds, bg_index=0, bg_threshold=0.4, seen=SEEN, unseen=UNSEEN, progress=False)
    iou, s, u, h = _seen_unseen_expect([lab], [pred])
    assert abs(s - u) > 0.1, 'seen and unseen differ, so a swap shows'
    np.testing.assert_allclose(r['iou'], iou, atol=1e-12)
    assert (r['miou_seen'], r['miou_unseen'], r['hiou']) == pytest.approx((s, u, h), abs=1e-12)
    assert 'miou_seen' not in evaluate(PositionOracle(smooth3), ds, bg_index=0, bg_threshold=0.4, progress=False)


def test_run_protocol_seen_unseen_on_world_folder(tmp_path):
    """`run_protocol('world', seen=, unseen=)` on a VOC-layout folder written by hand: the world preset's cosine
    threshold 0.3 on whole images; seen/unseen mIoU and hIoU against the hand computation."""
    from vilseg.protocols import run_protocol
    H, W = 18, 22
    root = tmp_path / 'w'
    for d in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'): (root / d).mkdir(parents=True)
    (root / 'class_names.txt').write_text('background\na\nb\nc\n')
    pred = hand_pred(smooth3, H, W, 3, 0.3)                  # the preset's threshold
    labs = []
    for n, key in enumerate(['x0', 'x1']):
        lab = pred.copy(); yy = np.arange(H)[:, None].repeat(W, 1)
        lab[(pred == 3) & (yy % (2 + n) == 0)] = n; lab[1] = 255      # the unseen class partly wrong
        Image.new('RGB', (W, H), (90, 90, 90)).save(root / 'JPEGImages' / f'{key}.jpg')
        Image.fromarray(lab.astype(np.uint8), mode='L').save(root / 'SegmentationClass' / f'{key}.png')
        labs.append(lab)
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('x0\nx1\n')
    r = run_protocol(PositionOracle(smooth3), 'world', root, progress=False, seen=SEEN, unseen=UNSEEN)
    iou, s, u, h = _seen_unseen_expect(labs, [pred, pred])
    assert abs(s - u) > 0.1
    np.testing.assert_allclose(r['iou'], iou, atol=1e-12)
    assert (r['miou_seen'], r['miou_unseen'], r['hiou']) == pytest.approx((s, u, h), abs=1e-12)
    assert r['bg_threshold'] == 0.3 and r['n_images'] == 2


# ------------------------------------------------------------------------------------------------ confusion matrix, 2 processes
def _cm_worker(rank, world, init_file, preds, labs, out):
    from vilseg.metrics import ConfusionMatrix
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    cm = ConfusionMatrix(4).update(preds[rank], labs[rank]).all_reduce()
    out[rank, :16] = cm.mat.reshape(-1); out[rank, 16:] = cm.invalid
    dist.destroy_process_group()


def test_confusion_matrix_all_reduce_two_process_gloo(tmp_path):
    """`ConfusionMatrix.all_reduce()` in a real 2-process gloo group: each rank ends with the counts of both ranks'
    pixels, mat[g, p] = #(label g, prediction p), and `invalid[g]` = #(label g, prediction outside [0, C))."""
    g = torch.Generator().manual_seed(0)
    labs = torch.randint(0, 4, (2, 9, 7), generator=g); labs[:, 0, :3] = 255
    preds = torch.randint(0, 4, (2, 9, 7), generator=g); preds[0, 2, :2] = 4; preds[1, 5, 5] = -1; preds[1, 6, :3] = 9
    out = torch.zeros(2, 20, dtype=torch.int64).share_memory_()
    mp.spawn(_cm_worker, args=(2, str(tmp_path / 'init'), preds, labs, out), nprocs=2, join=True)
    mat, inv = np.zeros((4, 4), np.int64), np.zeros(4, np.int64)
    for l, p in zip(labs.flatten().tolist(), preds.flatten().tolist()):
        if l == 255: continue
        if 0 <= p < 4: mat[l, p] += 1
        else: inv[l] += 1
    assert inv.sum() == 6 and mat.sum() + inv.sum() == 2 * 9 * 7 - 6
    for rank in range(2):
        np.testing.assert_array_equal(out[rank, :16].view(4, 4).numpy(), mat)
        np.testing.assert_array_equal(out[rank, 16:].numpy(), inv)


# ------------------------------------------------------------------------------------------------ atomic writes, RNG state
class Crash(BaseException):
    "A crash that is not an Exception (as KeyboardInterrupt or SystemExit)."


@pytest.mark.parametrize('exc', [OSError, Crash])
@pytest.mark.parametrize('which', ['text', 'json', 'save'])
def test_atomic_write_crash_midway_leaves_old_file(tmp_path, monkeypatch, which, exc):
    """A crash in the middle of writing (half the bytes written, then an error) leaves the old file byte for byte
    and no other file in the folder (the temporary file is removed): write to a temporary file, fsync, `os.replace`."""
    import vilseg.core as core
    path = tmp_path / 'target.bin'
    old = b'old content \x00\x01 that must survive\n' * 50
    path.write_bytes(old)
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
        def write(self, data):
            self.f.write(data[:len(data) // 2]); self.f.flush(); raise exc('crash mid-write')
        def __getattr__(self, k): return getattr(self.f, k)

    monkeypatch.setattr(core.os, 'fdopen', lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    payload = {'a': list(range(2000))}
    with pytest.raises(exc):
        if which == 'text': core.atomic_write_text(path, 'new ' * 5000)
        elif which == 'json': core.atomic_write_json(path, payload)
        else: core.atomic_save({'w': torch.arange(5000.)}, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ['target.bin']
    monkeypatch.undo()
    if which == 'save':                 # and the write goes through when nothing crashes
        core.atomic_save({'w': torch.arange(5000.)}, path)
        assert torch.equal(core.load_checkpoint(path)['w'], torch.arange(5000.))


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    """`rng_state()` saved by `atomic_save` and restored by `load_checkpoint` + `set_rng_state` continues python's,
    numpy's and torch's generators exactly where they were (the draws after restoring equal those made right after
    the state was taken, and differ from a fresh seed's)."""
    from vilseg.core import rng_state, set_rng_state, atomic_save, load_checkpoint, set_seed
    set_seed(123); random.random(); np.random.rand(3); torch.rand(3)     # somewhere in the middle of the streams
    atomic_save({'rng': rng_state()}, tmp_path / 'ck.pt')
    def draws(): return (random.random(), np.random.rand(4).tolist(), torch.rand(4).tolist(), random.getrandbits(64))
    want = draws()
    set_seed(123)
    assert draws() != want
    set_rng_state(load_checkpoint(tmp_path / 'ck.pt')['rng'])
    assert draws() == want


# ------------------------------------------------------------------------------------------------ model: stop-gradient, EMA
def micro(**kw):
    from vilseg.vilseg import ViLSeg, ViLSegConfig
    torch.manual_seed(0)
    return ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16, **kw))


def hand_infonce(q, k, temperature):
    "mean_i -log softmax_j(q_i . k_j / T)[target(i)], where row i of q belongs to key target(i) = i // (len(q)/len(k))."
    m = q.shape[0] // k.shape[0]
    logits = q @ k.T / temperature
    tgt = torch.arange(k.shape[0]).repeat_interleave(m)
    return -(logits - logits.logsumexp(1, keepdim=True))[torch.arange(q.shape[0]), tgt].mean()


def test_vision_contrast_target_gets_no_gradient():
    """`vision_contrast_loss(local, target)`: InfoNCE of each crop against the batch's global embeddings, the targets
    a stop-gradient: after backward `target.grad` is None and `local.grad` is that of the hand InfoNCE."""
    from vilseg.losses import vision_contrast_loss
    torch.manual_seed(0)
    loc = F.normalize(torch.randn(5, 3, 8), dim=-1).requires_grad_()
    tgt = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    loss = vision_contrast_loss(loc, tgt, 0.2)
    loss.backward()
    assert tgt.grad is None
    loc2 = loc.detach().clone().requires_grad_()
    ref = hand_infonce(loc2.reshape(15, 8), tgt.detach(), 0.2)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)
    assert torch.allclose(loc.grad, loc2.grad, atol=1e-6)


def _batch(B=4, m=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {'global': torch.randn(B, 3, 32, 32, generator=g), 'local': torch.randn(B, m, 3, 16, 16, generator=g),
            'caption': ['a red star', 'two blue rings', 'a green box and a tree', 'a yellow heart'][:B]}


def _hand_losses(model, batch, tgt_visual=None, lambda_vision=1.0, T=0.1):
    """cross (symmetric InfoNCE, CLIP) + lambda_vision * vision (hand InfoNCE of the local crops against the global
    embeddings, detached, or the teacher's), built from the encoder outputs alone."""
    from vilseg.encoders import image_features, encode_text
    clip = model.clip
    img = F.normalize(image_features(clip, batch['global'], dense='none')['global'], dim=-1)
    txt = encode_text(clip, model.tokenizer(batch['caption']), normalize=True)
    logits = clip.logit_scale.exp() * img @ txt.T
    cross = (hand_infonce(img * clip.logit_scale.exp(), txt, 1.0) + hand_infonce(txt * clip.logit_scale.exp(), img, 1.0)) / 2
    assert torch.allclose(cross, (F.cross_entropy(logits, torch.arange(len(img))) + F.cross_entropy(logits.T, torch.arange(len(img)))) / 2)
    B, m = batch['local'].shape[:2]
    loc = F.normalize(image_features(clip, batch['local'].flatten(0, 1), dense='none')['global'], dim=-1)
    if tgt_visual is None: tgt = img.detach()
    else:
        with torch.no_grad():
            student = clip.visual; clip.visual = tgt_visual
            try: tgt = F.normalize(image_features(clip, batch['global'], dense='none')['global'], dim=-1)
            finally: clip.visual = student
    vision = hand_infonce(loc, tgt, T)
    return cross, vision, cross + lambda_vision * vision


def test_forward_vision_term_stops_gradient_at_targets():
    """The training forward (lambda_cluster=0): its loss and every parameter gradient equal those of the hand loss
    cross + 0.7 * vision whose targets are the global embeddings detached (the paper's stop-gradient); with the
    targets not detached the encoder's gradients would differ."""
    m = micro(lambda_cluster=0.0, lambda_vision=0.7).train()
    batch = _batch()
    o = m(batch)
    o['loss'].backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    cross, vision, loss = _hand_losses(m, batch, lambda_vision=0.7)
    assert float(o['cross']) == pytest.approx(float(cross.detach()), abs=1e-5) and float(o['vision']) == pytest.approx(float(vision.detach()), abs=1e-5)
    loss.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(n.startswith('clip.visual') for n in got)
    for n in want: assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), n
    # the check has teeth: the hand vision term with targets that carry gradient moves the visual tower differently
    from vilseg.encoders import image_features
    def vision_grads(detach):
        m.zero_grad(set_to_none=True)
        img = F.normalize(image_features(m.clip, batch['global'], dense='none')['global'], dim=-1)
        loc = F.normalize(image_features(m.clip, batch['local'].flatten(0, 1), dense='none')['global'], dim=-1)
        hand_infonce(loc, img.detach() if detach else img, 0.1).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and n.startswith('clip.visual')}
    a, b = vision_grads(True), vision_grads(False)
    assert any(not torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)


def test_ema_teacher_update_formula_and_targets():
    """EMA teacher (ema_momentum = m > 0): `update_teacher()` sets every teacher parameter to m * teacher + (1 - m) *
    student (matched by name), and the vision targets of the forward are the teacher's normalised global embeddings."""
    m = micro(lambda_cluster=0.0, lambda_vision=1.0, ema_momentum=0.9).train()
    assert m.teacher is not None and not any(p.requires_grad for p in m.teacher.parameters())
    with torch.no_grad():                                     # teacher and student apart, as after some training
        for p in m.clip.visual.parameters(): p.add_(0.05 * torch.randn_like(p))
    T = {n: p.detach().clone() for n, p in m.teacher.named_parameters()}
    S = {n: p.detach().clone() for n, p in m.clip.visual.named_parameters()}
    assert T.keys() == S.keys() and any(not torch.equal(T[n], S[n]) for n in T)
    batch = _batch()
    o = m(batch)
    _, vision, _ = _hand_losses(m, batch, tgt_visual=m.teacher)
    _, vision_student, _ = _hand_losses(m, batch)
    assert float(o['vision']) == pytest.approx(float(vision.detach()), abs=1e-5)
    assert abs(float(vision.detach()) - float(vision_student.detach())) > 1e-3, 'teacher and student targets give different losses'
    m.update_teacher()
    for n, p in m.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * T[n] + 0.1 * S[n], atol=1e-6), n
    for n, p in m.clip.visual.named_parameters(): assert torch.equal(p, S[n]), 'the student is not touched'


# ------------------------------------------------------------------------------------------------ the two views of the clustering loss
class OneHotHead(torch.nn.Module):
    "A stand-in clustering head: the soft assignment of a one-hot feature is (nearly) that one-hot, softmax(30 z)."
    def assign(self, z): return (30 * z).softmax(-1)


def test_cluster_loss_aligned_pair_beats_unaligned():
    """`ViLSeg.cluster_loss` on a known crop: global maps of 4 clusters in random 8x8 blocks (32x48 grid, 2 images),
    the paired view's map cut out of each by hand (its box, nearest sampling, flipped for image 1). With the true
    box and flip the IIC loss is near its floor -H(p) (p: the cluster shares of the paired view; IIC = -I(X;Y)
    and I <= H(p), equal for a perfect alignment); an unaligned pair (flip ignored, box read as (y, x), boxes of the other image) scores worse."""
    m = micro()
    m.head = OneHotHead()
    n, h, w, K = 2, 32, 48, 4
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, K, (n, h // 8, w // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    box = torch.tensor([[0.25, 0.0, 0.75, 1.0], [0.0, 0.25, 0.5, 1.0]])           # x0, y0, x1, y1 of the global view
    flip = torch.tensor([False, True])
    pair = torch.zeros(n, h, w, dtype=torch.long)
    for b in range(n):
        x0, y0, x1, y1 = (box[b] * torch.tensor([w, h, w, h])).tolist()
        for py in range(h):
            for px in range(w):
                sx = w - 1 - px if flip[b] else px                                # the pair was flipped after the crop
                gy, gx = y0 + (py + 0.5) * (y1 - y0) / h, x0 + (sx + 0.5) * (x1 - x0) / w
                pair[b, py, px] = ids[b, int(gy), int(gx)]
    zg, zp = F.one_hot(ids, K).float(), F.one_hot(pair, K).float()
    p = torch.bincount(pair.flatten(), minlength=K).double() / pair.numel()
    floor = float((p * p.log()).sum())                                            # -H(p)
    aligned = float(m.cluster_loss(zg, zp, box, flip))
    # roi_align blends neighbouring cells within a pixel of a block edge (about a fifth of the cells here): at least
    # three quarters of the mutual information I = H(p) of a perfect alignment must remain
    assert floor - 1e-4 <= aligned <= 0.75 * floor, (aligned, floor)
    wrong = {'flip ignored': (box, torch.zeros(n, dtype=torch.bool)), 'flip inverted': (box, ~flip),
             'box as (y, x)': (box[:, [1, 0, 3, 2]], flip), 'boxes of the other image': (box.flip(0), flip)}
    for why, (b_, f_) in wrong.items():
        bad = float(m.cluster_loss(zg, zp, b_, f_))
        print(why, bad)
        assert bad > aligned + 0.2, (why, bad, aligned)


def test_multiview_pair_box_and_flip_describe_the_pair():
    """`MultiView`'s `pair_box` (x0, y0, x1, y1 in the global view's [0, 1] coordinates) and `pair_flip` say where
    the paired view was cut: resampling the global view at that box (`align_to_pair`, flipped when the flag says so)
    gives the paired view's pixels. The image is a linear ramp in x (red) and y (green), which resizing and roi_align
    keep linear, so the comparison is exact up to the borders; colour jitter is off."""
    from vilseg.views import MultiView, ViewConfig, denormalize, align_to_pair
    H = W = 64
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    img = torch.stack([20 + 3 * xx, 20 + 3 * yy, torch.full_like(xx, 128)]).to(torch.uint8)
    mv = MultiView(ViewConfig(global_size=32, n_local=0, pair=True, global_jitter=0, pair_jitter=0, pair_gray=0,
                              pair_scale=(0.2, 0.6), global_scale=(0.5, 1.0)))
    flips = []
    for seed in range(8):
        torch.manual_seed(seed)
        v = mv(img)
        g, pv = denormalize(v['global']) * 255, denormalize(v['pair']) * 255
        assert v['pair_box'].shape == (4,) and (v['pair_box'][2:] > v['pair_box'][:2]).all()
        back = align_to_pair(g[None], v['pair_box'][None], v['pair_flip'].view(1), 32)[0]
        inner = (slice(None), slice(3, -3), slice(3, -3))
        err = (back - pv)[inner].abs().max()
        assert err < 2.0, (seed, float(err))
        # the pair's red ramp runs left to right unless it was flipped
        dx = float((pv[0, :, -4] - pv[0, :, 3]).mean())
        assert (dx < 0) == bool(v['pair_flip']), (seed, dx)
        flips.append(bool(v['pair_flip']))
    assert len(set(flips)) == 2, 'both flipped and unflipped pairs were checked'


# ------------------------------------------------------------------------------------------------ training: skipped samples, EMA in the loop
def hand_lr(base, k, warmup, total, min_ratio):
    "Learning rate after k scheduler steps: linear warmup (k+1)/warmup, then cosine from 1 down to min_ratio."
    if k < warmup: return base * (k + 1) / warmup
    p = min(1.0, (k - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@pytest.fixture(scope='module')
def tiny_world(tmp_path_factory):
    from vilseg.world import make_world, WorldConfig
    root = tmp_path_factory.mktemp('world') / 'w'
    make_world(root, n_train=16, n_val=2, cfg=WorldConfig(image_size=32), shard_size=64, workers=1, progress=False)
    return root


def test_training_counts_skipped_samples_exactly(tiny_world, tmp_path, monkeypatch):
    """A training run over a world with corrupt images: `skipped_samples` is the number of corrupt samples drawn
    over all steps (each draw counts), the log's cumulative `skipped` at each step likewise; a batch with fewer
    than 2 good samples (here one of only bad samples, one with a single good one) takes no optimiser step but
    still advances the step counter and the schedule; every optimiser step is followed by one EMA update of the
    teacher, t <- m t + (1 - m) s. The batches come from the run's sampler; the expectation is counted by hand."""
    from vilseg.train import train, TrainConfig, ResumableBatchSampler
    from vilseg.vilseg import ViLSeg
    root = tmp_path / 'w'; shutil.copytree(tiny_world, root)
    files = [l.split('\t')[0] for l in (root / 'captions' / 'train.tsv').read_text().splitlines()[1:]]
    steps, bs = 7, 4
    batches = [[i for i, _ in ResumableBatchSampler(len(files), bs, seed=0).batch(s)] for s in range(steps)]
    corrupt = set(batches[1]) | set(batches[2][:3]) | {batches[0][0]}        # step 1: all bad; step 2: one good
    for i in corrupt: (root / 'captions' / files[i]).write_bytes(b'\xff\xd8 not a jpeg')
    drawn_bad = [len([i for i in b if i in corrupt]) for b in batches]
    trained = [s for s, b in enumerate(batches) if bs - drawn_bad[s] >= 2]
    assert 1 not in trained and 2 not in trained and 0 in trained and drawn_bad[0] == 1
    assert sum(drawn_bad[3:]) > 0, 'corrupt samples are drawn again in the second epoch'

    ema_calls = []
    real_update = ViLSeg.update_teacher
    def checked_update(self):
        S = {n: p.detach().clone() for n, p in self.clip.visual.named_parameters()}
        T = {n: p.detach().clone() for n, p in self.teacher.named_parameters()}
        real_update(self)
        mo = self.cfg.ema_momentum
        ema_calls.append(all(torch.allclose(p, mo * T[n] + (1 - mo) * S[n], atol=1e-6) for n, p in self.teacher.named_parameters()))
    monkeypatch.setattr(ViLSeg, 'update_teacher', checked_update)

    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path / 'run'), model='vilseg-micro', image_size=32, local_size=16,
                      n_local=1, n_clusters=4, head_hidden=16, batch_size=bs, steps=steps, warmup=3, lr=1e-3, min_lr_ratio=0.1,
                      num_workers=0, log_every=1, eval_images=2, calib_images=2, ema_momentum=0.6, progress=False)
    res = train(cfg)
    assert res['steps'] == steps and res['skipped_samples'] == sum(drawn_bad)
    log = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    recs = [r for r in log if 'loss' in r]
    assert [r['step'] for r in recs] == [s + 1 for s in trained]
    for r in recs:
        s = r['step']
        assert r['skipped'] == sum(drawn_bad[:s]), (s, r['skipped'])
        assert r['lr'] == pytest.approx(hand_lr(1e-3, s, 3, steps, 0.1), rel=1e-9), s
    assert ema_calls == [True] * len(trained)


# ------------------------------------------------------------------------------------------------ learning
TWO = ('circle', 'star')


class TwoShapeVal:
    "The world's val images whose one object is a circle or a star, labels mapped to 0 background, 1 circle, 2 star."
    def __init__(self, root):
        from vilseg.segdata import VOCStyleSegmentation
        val = VOCStyleSegmentation(root, 'val')
        idx = [0] + [[n[0] for n in val.class_names].index(s) for s in TWO]
        self.class_names, self.items = [val.class_names[c] for c in idx], []
        for i in range(len(val)):
            it = val[i]; lab = it['label']
            present = set(lab.unique().tolist()) - {0, 255}
            if present and present <= set(idx[1:]):
                new = torch.full_like(lab, 255)
                for j, c in enumerate(idx): new[lab == c] = j
                self.items.append(dict(image=it['image'], label=new))
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]


@pytest.mark.slow
def test_training_improves_segmentation(tmp_path):
    """A learning test (about a minute on one core): ViL-Seg (vilseg-micro, all three losses) trained for 300 steps on
    the captions of a one-object world restricted to circles and stars; the val mIoU of the paper's read-out
    ('cluster') and of the dense baseline, each at the background threshold calibrated on the same images, must beat
    those of the same model untrained (same seed, so the same initial weights) by 0.025. The untrained model names no
    shape (its calibrated map is all background: mIoU about IoU(background) / 3)."""
    from vilseg.world import make_world, WorldConfig
    from vilseg.train import train, TrainConfig, validate
    from vilseg.vilseg import ViLSeg
    from vilseg.core import load_checkpoint, set_seed
    root = tmp_path / 'w'
    make_world(root, n_train=1600, n_val=200, cfg=WorldConfig(image_size=32, max_objects=1, object_weights=(1.0,), clutter=0,
               min_size=0.5, p_distractor=0, p_omit=0), shard_size=4096, workers=1, progress=False)
    canon = (root / 'captions' / 'train_canonical.tsv').read_text().splitlines()[1:]
    noisy = (root / 'captions' / 'train.tsv').read_text().splitlines()[1:]
    keep = [n for c, n in zip(canon, noisy) if c.split('\t')[1] in {f'a {s}' for s in TWO}]
    assert len(keep) > 150
    (root / 'captions' / 'two.tsv').write_text('filepath\ttitle\n' + ''.join(k + '\n' for k in keep))
    val = TwoShapeVal(root)
    assert len(val) >= 15
    cfg = TrainConfig(data=str(root / 'captions' / 'two.tsv'), out_dir=str(tmp_path / 'run'), model='vilseg-micro',
                      image_size=32, local_size=16, n_local=1, n_clusters=4, head_hidden=32, batch_size=32, steps=300,
                      lr=3e-3, warmup=10, cluster_warmup=20, num_workers=0, log_every=50, progress=False, seed=0)
    set_seed(cfg.seed)
    before = validate(ViLSeg(cfg.model_config()), val, val, len(val), len(val))
    train(cfg)
    m = ViLSeg(cfg.model_config()); m.load_state_dict(load_checkpoint(tmp_path / 'run' / 'checkpoint.pt')['model'])
    after = validate(m, val, val, len(val), len(val))
    print('learning test: val mIoU', {k: (round(before[k]['miou'], 3), round(after[k]['miou'], 3)) for k in before})
    for method in ('cluster', 'dense'):
        assert after[method]['miou'] > before[method]['miou'] + 0.025, (method, before[method]['miou'], after[method]['miou'])
