"""Computations named after reference code, checked against independent implementations written here.

- dense read-outs (vilseg.encoders.image_features): MaskCLIP `mmseg/models/backbones/vit.py` (value path + residual +
  MLP; TCL `sclip/model.py` ignore_last_attn gives the same), the ClearCLIP-style value path, SCLIP `clip/model.py`
  `custom_attn(csa=True)`; each reference is built from open_clip's own modules (the block's
  `nn.MultiheadAttention` with a diagonal mask, its MLP, the model's `forward` with `output_tokens`), not from ours;
- QuickGELU weights files (vilseg.encoders.create_clip) and the OpenAI TorchScript converter (data_prep/openai_clip.py).
"""
import json, math, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from vilseg.encoders import image_features, create_clip, uses_quickgelu, DENSE_READOUTS

ROOT = Path(__file__).resolve().parents[1]


def _randomise(model, seed=0):
    "Random LayerNorm weights/biases and linear/attention biases, so a dropped term or norm shows."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g)); m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=g))
    return model


@pytest.fixture(scope='module')
def vit():
    torch.set_num_threads(1); torch.manual_seed(0)
    m = _randomise(open_clip.create_model('ViT-B-16', pretrained=None).eval())
    return m


def _reference_model(m, size):
    "An open_clip ViT-B-16 built for `size` (its own positional-embedding resize, open_clip's `resize_pos_embed`)."
    if size == 224: return m
    from open_clip.model import resize_pos_embed
    r = open_clip.create_model('ViT-B-16', pretrained=None, force_image_size=size).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    resize_pos_embed(sd, r, interpolation='bicubic', antialias=False)
    r.load_state_dict(sd)
    return r


def _reference(m, images, readout):
    """Patch embeddings `B x h x w x D` by the reference rule, run through open_clip's own forward with the last block's
    forward replaced (MaskCLIP/TCL: a diagonal attention mask; ClearCLIP: that attention output alone; SCLIP: q-q + k-k)."""
    v = m.visual; blk = v.transformer.resblocks[-1]; orig = blk.forward

    def diag_attention(u):
        L = u.shape[1]; mask = torch.full((L, L), float('-inf')); mask.fill_diagonal_(0)
        return blk.attn(u, u, u, need_weights=False, attn_mask=mask)[0]

    def sclip_attention(u):
        W = u.shape[-1]; nh = blk.attn.num_heads; d = W // nh; B, L, _ = u.shape
        q, k, val = F.linear(u, blk.attn.in_proj_weight, blk.attn.in_proj_bias).split(W, dim=-1)
        q, k, val = (t.reshape(B, L, nh, d).permute(0, 2, 1, 3) for t in (q, k, val))
        wq = torch.einsum('bhid,bhjd->bhij', q, q) / math.sqrt(d)
        wk = torch.einsum('bhid,bhjd->bhij', k, k) / math.sqrt(d)
        o = torch.einsum('bhij,bhjd->bhid', wq.softmax(-1) + wk.softmax(-1), val)
        return F.linear(o.permute(0, 2, 1, 3).reshape(B, L, W), blk.attn.out_proj.weight, blk.attn.out_proj.bias)

    def last(x, *a, **kw):
        if readout == 'tokens': return orig(x, *a, **kw)
        if readout == 'clearclip': return diag_attention(blk.ln_1(x))
        att = diag_attention(blk.ln_1(x)) if readout == 'maskclip' else sclip_attention(blk.ln_1(x))
        y = x + att
        return y + blk.mlp(blk.ln_2(y))

    blk.forward = last
    try:
        v.output_tokens = True
        with torch.no_grad(): _, tokens = v(images)
    finally:
        blk.forward = orig; v.output_tokens = False
    z = tokens @ v.proj                                   # tokens come out of ln_post; open_clip projects the pooled one only
    h = images.shape[-2] // 16
    return z.reshape(images.shape[0], h, -1, z.shape[-1])


@pytest.mark.parametrize('size', [224, 448])
def test_dense_readouts_equal_reference(vit, size):
    "Each read-out equals its reference on a random ViT-B-16 with randomised norms and biases, at 224 and 448."
    torch.manual_seed(size)
    x = torch.randn(1, 3, size, size)
    ref_model = _reference_model(vit, size)
    outs = {}
    for r in DENSE_READOUTS:
        with torch.no_grad(): ours = image_features(vit, x, dense=r)['patches']
        ref = _reference(ref_model, x, r)
        assert ours.shape == ref.shape == (1, size // 16, size // 16, 512)
        err = (ours - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, (r, size, err)
        outs[r] = ours
    # the read-outs differ from one another (a dropped residual or MLP would show)
    names = list(outs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            cos = F.cosine_similarity(outs[names[i]].flatten(0, 2), outs[names[j]].flatten(0, 2)).mean()
            assert cos < 0.99, (names[i], names[j], float(cos))
    with torch.no_grad(): assert torch.equal(image_features(vit, x, dense='value')['patches'], outs['clearclip'])


def test_unknown_readout_refused(vit):
    with pytest.raises(ValueError, match=r"unknown dense read-out 'maskclip\+'; valid: tokens, maskclip, clearclip, sclip, value, none"):
        image_features(vit, torch.zeros(1, 3, 32, 32), dense='maskclip+')


def test_quickgelu_checkpoint_and_warning(tmp_path):
    "A QuickGELU weights file loads into ViT-B-16-quickgelu silently; into ViT-B-16 (GELU) it warns."
    torch.manual_seed(0)
    src = open_clip.create_model('ViT-B-16-quickgelu', pretrained=None)
    assert uses_quickgelu(src)
    f = tmp_path / 'openai_like.pt'
    torch.save({k: v.half() for k, v in src.state_dict().items()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m, _ = create_clip('ViT-B-16-quickgelu', str(f))
    assert uses_quickgelu(m)
    p = dict(m.named_parameters())['visual.transformer.resblocks.3.mlp.c_fc.weight']
    assert torch.equal(p, src.state_dict()['visual.transformer.resblocks.3.mlp.c_fc.weight'].half().float())
    with pytest.warns(UserWarning, match='ViT-B-16-quickgelu'):
        g, _ = create_clip('ViT-B-16', str(f))
    assert not uses_quickgelu(g)


def test_openai_torchscript_converter(tmp_path):
    "data_prep/openai_clip.py: a TorchScript archive (as OpenAI releases it, fp16) -> a weights-only state dict file."
    torch.manual_seed(0)
    from vilseg.encoders import register_configs
    register_configs()
    src = open_clip.create_model('vilseg-micro', pretrained=None, force_quick_gelu=True).eval()
    src.register_buffer('input_resolution', torch.tensor(32))     # OpenAI's archives carry it (and two more); open_clip has no such key
    src = src.half()
    img = torch.zeros(1, 3, 32, 32, dtype=torch.half); txt = torch.zeros(1, 24, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ts = torch.jit.trace(src, (img, txt), strict=False, check_trace=False)
    ts.save(str(tmp_path / 'ViT-micro.pt'))
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'openai_clip.py'), str(tmp_path / 'ViT-micro.pt'),
                        str(tmp_path / 'micro.pt')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / 'micro.pt', weights_only=True)
    want = {k: v.float() for k, v in src.state_dict().items() if k not in ('input_resolution', 'attn_mask')}
    assert set(sd) == set(want) and all(sd[k].dtype == torch.float32 and torch.equal(sd[k], want[k]) for k in want)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        m = open_clip.create_model('vilseg-micro', pretrained=str(tmp_path / 'micro.pt'), force_quick_gelu=True)   # strict load
    assert uses_quickgelu(m) and torch.equal(m.visual.proj, want['visual.proj'])
    # refuses to overwrite, and refuses a file that is not TorchScript
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'openai_clip.py'), str(tmp_path / 'ViT-micro.pt'),
                        str(tmp_path / 'micro.pt')], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'exists' in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / 'openai_clip.py'), str(tmp_path / 'micro.pt'),
                        str(tmp_path / 'other.pt')], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'TorchScript' in r.stderr


# ------------------------------------------------------------------------------------------------ benchmark labels
def _script(name, *args):
    r = subprocess.run([sys.executable, str(ROOT / 'data_prep' / name), *map(str, args)], capture_output=True, text=True, timeout=300)
    return r


def test_coco_object_from_stuffthingmaps_as_groupvit(tmp_path):
    """GroupViT convert_dataset/convert_coco_object.py: thing value v -> its rank + 1 among the 80 thing ids, every
    stuff value and unlabeled (255) -> 0, no 255. The table is written here from COCO's 80 thing ids."""
    from PIL import Image
    from vilseg.segdata import CocoObject, read_label
    thing_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]   # COCO's 80 thing ids
    assert len(thing_ids) == 80
    table = {cid - 1: rank + 1 for rank, cid in enumerate(thing_ids)}            # stored value = id - 1
    table.update({v: 0 for v in list(range(91, 182)) + [255]})                  # stuff, unlabeled
    values = sorted(table)                                                       # every value a real map holds
    # a hand-made map: a person (thing), a crowd of people (in stuffthingmaps just more 'person' pixels), stuff
    # (grass, id 124), unlabeled, then one pixel of every valid value
    a = np.full((24, 20), 123, np.uint8); a[:4, :5] = 0; a[4:8, :5] = 0; a[8:12, :5] = 255; a[:4, 5:10] = 17
    flat = a.reshape(-1); flat[-len(values):] = values
    maps = tmp_path / 'stuffthingmaps' / 'val2017'; maps.mkdir(parents=True)
    Image.fromarray(a).save(maps / '000000000139.png')
    (tmp_path / 'coco' / 'val2017').mkdir(parents=True)
    Image.new("RGB", (20, 24)).save(tmp_path / 'coco' / 'val2017' / '000000000139.jpg')
    r = _script('coco_object.py', '--maps', maps, '--images', tmp_path / 'coco' / 'val2017', '--out', tmp_path / 'obj', '--quiet')
    assert r.returncode == 0, r.stderr
    got = read_label(tmp_path / 'obj' / 'annotations' / 'val2017' / '000000000139_instanceTrainIds.png').numpy()
    want = np.vectorize(table.get)(a)
    assert np.array_equal(got, want) and got.max() == 80 and 255 not in got
    assert got[0, 0] == 1 and got[5, 0] == 1 and got[0, 6] == 17 and got[9, 0] == 0 and got[0, 12] == 0
    ds = CocoObject(tmp_path / 'obj'); assert ds.class_names[17] == ['dog'] and int(ds[0]['label'][0, 6]) == 17
    # a value no COCO category uses is refused, with the file named
    a[0, 0] = 11; Image.fromarray(a).save(maps / '000000000139.png')
    r = _script('coco_object.py', '--maps', maps, '--out', tmp_path / 'obj2', '--quiet')
    assert r.returncode == 1 and '000000000139.png' in r.stderr


def test_context_split_from_detail_json(tmp_path):
    """mmseg tools/dataset_converters/pascal_context.py: the split is the Detail API json's images of that phase
    (sorted); a listed image without a .mat file is left out and named."""
    from scipy.io import savemat
    from PIL import Image
    from vilseg.segdata import CONTEXT59
    voc = tmp_path / 'VOC2010'; (voc / 'ImageSets' / 'Main').mkdir(parents=True); (voc / 'JPEGImages').mkdir()
    (voc / 'ImageSets' / 'Main' / 'val.txt').write_text('2008_000002\n2008_000003\n2008_000009\n')   # 3 ids (VOC's list)
    ann = tmp_path / 'trainval'; ann.mkdir()
    (tmp_path / 'labels.txt').write_text('\n'.join(f'{10 + k}: {syn[0]}' for k, syn in enumerate(CONTEXT59)))
    for i in ('2008_000002', '2008_000003'):
        savemat(ann / f'{i}.mat', {'LabelMap': np.full((4, 5), 10, np.uint16)}); Image.new('RGB', (5, 4)).save(voc / 'JPEGImages' / f'{i}.jpg')
    detail = dict(images=[dict(image_id=1, file_name='2008_000003.jpg', phase='val'), dict(image_id=2, file_name='2008_000002.jpg', phase='val'),
                          dict(image_id=3, file_name='2008_000004.jpg', phase='train'), dict(image_id=4, file_name='2008_000005.jpg', phase='val')])
    (tmp_path / 'trainval_merged.json').write_text(json.dumps(detail))
    r = _script('pascal_context.py', '--voc2010', voc, '--annotations', ann, '--labels', tmp_path / 'labels.txt',
                '--out', tmp_path / 'pc', '--splits', 'val', '--detail-json', tmp_path / 'trainval_merged.json', '--quiet')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['images'] == {'val': 2} and out['dropped'] == {'val': ['2008_000005']} and '2008_000005' in r.stderr
    assert (tmp_path / 'pc' / 'ImageSets' / 'SegmentationContext' / 'val.txt').read_text().split() == ['2008_000002', '2008_000003']
    # without the json: VOC 2010's Main list, the image without .mat named
    r = _script('pascal_context.py', '--voc2010', voc, '--annotations', ann, '--labels', tmp_path / 'labels.txt',
                '--out', tmp_path / 'pc2', '--splits', 'val', '--quiet')
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])['dropped'] == {'val': ['2008_000009']}


def test_sbd_lists_named_as_mmseg(tmp_path):
    "mmseg tools/dataset_converters/voc_aug.py: trainaug.txt = SBD train+val + VOC train - VOC val; aug.txt = SBD - VOC train - VOC val."
    from scipy.io import savemat
    from vilseg.prep import sbd_to_voc
    from PIL import Image
    voc = tmp_path / 'VOC2012'; seg = voc / 'ImageSets' / 'Segmentation'; seg.mkdir(parents=True); (voc / 'SegmentationClass').mkdir()
    seg.joinpath('train.txt').write_text('t1\nt2\n'); seg.joinpath('val.txt').write_text('v1\n')
    for i in ('t1', 't2', 'v1'): Image.fromarray(np.zeros((3, 4), np.uint8)).save(voc / 'SegmentationClass' / f'{i}.png')
    sbd = tmp_path / 'benchmark_RELEASE' / 'dataset'; (sbd / 'cls').mkdir(parents=True)
    sbd.joinpath('train.txt').write_text('s1\nt1\nv1\n'); sbd.joinpath('val.txt').write_text('s2\n')
    for i in ('s1', 't1', 'v1', 's2'): savemat(sbd / 'cls' / f'{i}.mat', {'GTcls': {'Segmentation': np.ones((3, 4), np.uint8)}})
    st = sbd_to_voc(sbd.parent, voc, progress=False)
    sbd_all, train, val = {'s1', 't1', 'v1', 's2'}, {'t1', 't2'}, {'v1'}
    assert set(seg.joinpath('trainaug.txt').read_text().split()) == (sbd_all | train) - val
    assert set(seg.joinpath('aug.txt').read_text().split()) == sbd_all - train - val
    assert st['trainaug'] == 4 and st['aug'] == 2


# ------------------------------------------------------------------------------------------------ protocols by reference
def _sclip_reference(logits, query_idx, logit_scale, prob_thd, area_thd):
    """SCLIP clip_segmentor.py `postprocess_result`, written here in numpy: softmax over queries at the logit scale;
    max over each class's queries; classes 1.. whose argmax area is <= area_thd x the foreground-predicted area are
    zeroed; argmax; below prob_thd -> 0."""
    z = logits * logit_scale
    p = np.exp(z - z.max(0)); p /= p.sum(0)
    C = max(query_idx) + 1
    P = np.zeros((C,) + p.shape[1:])
    for q, c in enumerate(query_idx): P[c] = np.maximum(P[c], p[q])
    if area_thd is not None:
        arg = P.argmax(0)
        area = np.array([(arg == c).sum() for c in range(1, C)], float)
        P[1:] *= (area > area_thd * area.sum())[:, None, None]
    pred = P.argmax(0)
    pred[P.max(0) < prob_thd] = 0
    return pred


def test_sclip_background_rule_on_handmade_scores():
    "vilseg.protocols.sclip_decision equals the reference rule: background words as queries, max over names, prob_thd, area_thd."
    from vilseg.protocols import sclip_decision
    # classes: 0 background (queries 0, 1: 'sky', 'wall'), 1 cat (query 2), 2 person (queries 3, 4: 'person', 'person in shirt')
    qc = [0, 0, 1, 2, 2]
    s = np.full((5, 6, 10), 0.20, np.float32)
    s[2, :, :5] = 0.30                         # cat on the left half
    s[4, :, 5:] = 0.29; s[3, :, 5:] = 0.21    # person on the right, through its second name (max over names)
    s[0, 0, :] = 0.35                          # sky along the top row: background through a background word
    s[2, 5, 0] = 0.90                          # a confident cat pixel
    s[:, 5, 9] = 0.25                          # a tie between all queries: every probability 0.2 -> background by prob_thd 0.3
    s[3, 3, 7] = 0.60                          # a lone strong 'person' pixel inside the person region
    t = torch.from_numpy(s)
    for scale, pthd, athd in ((65, 0.1, 0.1), (65, 0.3, None), (40, 0.0, None), (50, 0.1, 0.45), (50, 0.1, 0.505)):
        ours = sclip_decision(t, qc, 3, scale, pthd, athd).numpy()
        ref = _sclip_reference(s.astype(np.float64), qc, scale, pthd, athd)
        assert np.array_equal(ours, ref), (scale, pthd, athd)
    ours = sclip_decision(t, qc, 3, 65, 0.3, None).numpy()
    assert (ours[0] == 0).all() and ours[2, 0] == 1 and ours[2, 7] == 2 and ours[5, 9] == 0
    # area_thd: cat holds 25 of the 49 foreground-predicted pixels, person 24 (0.49): at 0.505 person is dropped
    assert ((sclip_decision(t, qc, 3, 50, 0.1, 0.45).numpy() == 2).sum(), (sclip_decision(t, qc, 3, 50, 0.1, 0.505).numpy() == 2).sum()) == (24, 0)


EXPECTED = {   # preset -> (short side, window, stride, logit scale, prob_thd, area_thd), from SCLIP's configs/cfg_*.py
    'voc21': (336, 224, 112, 65, 0.1, 0.1), 'voc20': (336, 224, 112, 40, 0.0, None),
    'context60': (336, 224, 112, 50, 0.1, None), 'context59': (336, 224, 112, 40, 0.0, None),
    'coco_object': (336, 224, 112, 50, 0.1, None), 'coco_stuff171': (448, 224, 112, 40, 0.0, None),
    'ade150': (336, 224, 112, 40, 0.0, None)}


def test_protocol_variants_match_their_cards():
    "Each variant's settings on every preset, written here from the reference files, and each card naming those files."
    from vilseg.protocols import get_protocol, PROTOCOL_VARIANTS, protocol_cards, TEMPLATE_SETS, get_templates
    from vilseg.segdata import read_class_names
    cards = protocol_cards()
    for f in ('configs/cfg_*.py', 'clip_segmentor.py', 'configs/cls_*.txt', 'prompts/imagenet_template.py',
              'segmentation/configs/_base_/datasets/*.py', 'segmentation/evaluation/tcl_seg.py', 'configs/eval.yml',
              'datasets/templates.py', 'models/tcl/tcl.py', 'us/misc.py'):
        assert f in cards, f
    for b, (short, win, stride, scale, pthd, athd) in EXPECTED.items():
        p = get_protocol(b, 'sclip')
        assert (p.short_side, p.window, p.stride, p.prob_scale, p.prob_thd, p.area_thd) == (short, win, stride, scale, pthd, athd), b
        assert (p.resize, p.pixel_norm, p.synonyms, p.bg_rule, p.pamr_iters, p.templates) == ('mmseg', 'clip', 'max', 'query', 0, 'imagenet80')
        names = read_class_names(p.class_names_file, unique=False)
        assert Path(p.class_names_file).parent.name == 'sclip'
        t = get_protocol(b, 'tcl')
        assert (t.short_side, t.window, t.stride, t.resize, t.pixel_norm, t.bg_rule, t.bg_threshold, t.score_map) == \
            (448, 448, 224, 'mmseg', 'imagenet', 'constant', 0.4, 'tcl_kp'), b
        assert t.pamr_iters == 10 and t.pamr_scale == 0.25 and tuple(t.pamr_dilations) == (1, 2, 4, 8, 12, 24) and len(get_templates(t.templates)) == 9
        assert all(len(c) == 1 for c in read_class_names(t.class_names_file))          # the datasets' single names
    # SCLIP's background queries: 26 stuff words for VOC21 and COCO-Object, 'background' for Context60
    bgw = read_class_names(get_protocol('voc21', 'sclip').class_names_file, unique=False)[0]
    assert len(bgw) == 26 and bgw[0] == 'sky' and bgw[-1] == 'fence'
    assert read_class_names(get_protocol('coco_object', 'sclip').class_names_file, unique=False)[0] == bgw
    assert read_class_names(get_protocol('context60', 'sclip').class_names_file, unique=False)[0] == ['background']
    assert read_class_names(get_protocol('voc20', 'sclip').class_names_file, unique=False)[14][:2] == ['person', 'person in shirt']
    assert read_class_names(get_protocol('voc20', 'tcl').class_names_file)[10] == ['diningtable']
    assert TEMPLATE_SETS['tcl'][-1] == 'a photo of {}s.'
    v = get_protocol('voc21', 'vilseg')
    assert v == get_protocol('voc21') and (v.short_side, v.bg_rule, v.bg_score, v.bg_threshold, v.prob_scale) == (448, 'threshold', 'prob', 0.1, 100.0)
    assert set(PROTOCOL_VARIANTS) == {'vilseg', 'sclip', 'tcl'}


@pytest.fixture(scope='module')
def quickgelu_file(tmp_path_factory):
    torch.manual_seed(0)
    f = tmp_path_factory.mktemp('w') / 'vitb16_quickgelu.pt'
    torch.save({k: v.half() for k, v in open_clip.create_model('ViT-B-16-quickgelu', pretrained=None).state_dict().items()}, f)
    return f


@pytest.mark.parametrize('protocol,dense', [('sclip', 'sclip'), ('tcl', 'maskclip')])
def test_cli_reference_protocol_end_to_end(tmp_path, quickgelu_file, protocol, dense):
    "`vilseg eval --model ViT-B-16-quickgelu --pretrained FILE --preset voc21 --protocol P --dense D` on the official-format VOC fixture."
    sys.path.insert(0, str(ROOT / 'tests'))
    from test_protocols import write_voc
    root = write_voc(tmp_path / 'VOC2012')
    cmd = [str(Path(sys.executable).parent / 'vilseg'), 'eval', '--model', 'ViT-B-16-quickgelu', '--pretrained', str(quickgelu_file),
           '--preset', 'voc21', '--data', str(root), '--protocol', protocol, '--dense', dense, '--max-images', '1',
           '--out-dir', str(tmp_path / 'ev'), '--progress', 'false']
    if protocol == 'sclip': cmd += ['--templates', 'short']       # 56 queries x 80 templates would take minutes on 2 cores
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'QuickGELU' not in r.stderr
    got = json.loads(r.stdout)
    assert got['protocol'] == protocol and got['dense'] == dense and got['n_images'] == 1 and 0 <= got['miou'] <= 1
    saved = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    want = (336, 224, 112) if protocol == 'sclip' else (448, 448, 224)
    assert (saved['protocol']['short_side'], saved['protocol']['window'], saved['protocol']['stride']) == want
    assert saved['protocol']['variant'] == protocol and len(saved['per_class_iou']) == 21
