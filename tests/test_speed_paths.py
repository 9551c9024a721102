"""The fast paths of the read-out compute what the plain ones do (`bench/bench_readout.py` measures their speed):
- PAMR (`vilseg.clustering.pamr`) as one sparse matrix product per step and in groups of images, and as the sum of
  shifted maps (other devices), against `_pamr_reference`, written from the equation in `tests/test_ddp_exact.py`;
- the image tower's attention through `scaled_dot_product_attention` for long sequences (`vilseg.encoders._attention_kernel`)
  against torch's fused fast path, and the process-wide switch restored afterwards."""
import pytest
import torch

import vilseg.clustering as cl
import vilseg.encoders as enc
from test_ddp_exact import _pamr_reference


@pytest.mark.parametrize('sparse', [True, False])
@pytest.mark.parametrize('chunk', [1, 1 << 20])
def test_pamr_paths_equal_the_reference(monkeypatch, sparse, chunk):
    monkeypatch.setattr(cl, 'PAMR_SPARSE', sparse)
    g = torch.Generator().manual_seed(3)
    # a contrast and offset per channel, odd sizes, dilations reaching past the image (replicate padding), 3 images
    img = torch.rand(3, 3, 9, 13, generator=g) * torch.tensor([3.0, 0.5, 1.0]).view(1, 3, 1, 1) - 0.7
    S = torch.randn(3, 5, 9, 13, generator=g)
    for ds, iters in (((1, 2, 4), 4), ((1, 2, 4, 8, 12, 24), 10), ((3,), 1)):
        ref = _pamr_reference(img, S, iters, ds)
        out = cl.pamr(img, S, iters, ds, chunk=chunk)
        assert out.shape == S.shape and out.dtype == S.dtype
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # the refinement moves the scores (a no-op would pass a loose check), and float64 stays float64
    assert (ref - S).abs().max() > 0.1
    assert cl.pamr(img, S.double(), 4, (1, 2)).dtype == torch.float64
    torch.testing.assert_close(cl.pamr(img, S.double(), 4, (1, 2), chunk=chunk), _pamr_reference(img.double(), S.double(), 4, (1, 2)),
                               atol=1e-5, rtol=1e-5)                 # the affinities are computed in float32


def test_pamr_groups_do_not_mix_images():
    "Images refined in groups of one equal the whole batch at once, and an image's result depends on itself only."
    g = torch.Generator().manual_seed(4)
    img, S = torch.rand(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    whole = cl.pamr(img, S, 5, (1, 2, 4), chunk=1 << 30)
    torch.testing.assert_close(cl.pamr(img, S, 5, (1, 2, 4), chunk=1), whole)
    S2 = S.clone(); S2[1:] = torch.randn(3, 3, 16, 16, generator=g)
    torch.testing.assert_close(cl.pamr(img, S2, 5, (1, 2, 4), chunk=1 << 30)[0], whole[0])


def test_attention_kernels_agree_and_the_switch_is_restored(monkeypatch):
    from vilseg.encoders import create_clip, image_features
    torch.manual_seed(0)
    model, _ = create_clip('vilseg-micro')
    model.eval()
    x = torch.randn(2, 3, 96, 128)                                  # 8-px patches: 12 x 16 + 1 = 193 tokens
    assert torch.backends.mha.get_fastpath_enabled()
    outs = {}
    for name, limit in (('fused', 10 ** 9), ('sdpa', 0)):
        monkeypatch.setattr(enc, 'FASTPATH_MAX_TOKENS', limit)
        with torch.no_grad(): outs[name] = image_features(model, x, dense='maskclip')
        assert torch.backends.mha.get_fastpath_enabled()
    for k in ('patches', 'tokens', 'global'):
        torch.testing.assert_close(outs['sdpa'][k], outs['fused'][k], atol=1e-5, rtol=1e-5)
    # the switch is off inside a long forward and restored when the forward fails
    seen = []
    blk = model.visual.transformer.resblocks[0]
    def boom(*a, **kw):
        seen.append(torch.backends.mha.get_fastpath_enabled()); raise RuntimeError('boom')
    monkeypatch.setattr(blk, 'forward', boom)
    with pytest.raises(RuntimeError, match='boom'), torch.no_grad(): image_features(model, x, dense='maskclip')
    assert seen == [False] and torch.backends.mha.get_fastpath_enabled()


def test_sliding_windows_sum_channels_last_scores_as_contiguous_ones():
    "slide_scores averages the windows the same whether the read-out returns channels-last or contiguous maps."
    from vilseg.evaluate import slide_scores
    class Oracle:                                               # smooth scores from the pixel values and the window's position
        def __init__(self, channels_last): self.cl = channels_last
        def scores(self, x, names, **kw):
            s = torch.stack([x.float().mean(1) * (k + 1) / 255 + 0.01 * k for k in range(len(names))], 1)
            s = s + torch.linspace(0, 1, x.shape[-1])            # differs per window placement: the averaging shows
            return s.contiguous(memory_format=torch.channels_last) if self.cl else s
    x = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = slide_scores(Oracle(True), x, ['a', 'b', 'c'], 24, 10)
    b = slide_scores(Oracle(False), x, ['a', 'b', 'c'], 24, 10)
    assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
    torch.testing.assert_close(a, b, atol=0, rtol=0)
