"""Computations named after reference code, checked against independent implementations written here.

- dense read-outs (vilseg.encoders.image_features): MaskCLIP `mmseg/models/backbones/vit.py` (value path + residual +
  MLP; TCL `sclip/model.py` ignore_last_attn gives the same), the ClearCLIP-style value path, SCLIP `clip/model.py`
  `custom_attn(csa=True)`; each reference is built from open_clip's own modules (the block's
  `nn.MultiheadAttention` with a diagonal mask, its MLP, the model's `forward` with `output_tokens`), not from ours;
- QuickGELU weights files (vilseg.encoders.create_clip) and the OpenAI TorchScript converter (data_prep/openai_clip.py).
"""
import math, subprocess, sys, warnings
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
