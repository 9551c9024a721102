"""Class-name embeddings of frozen weights are cached on disk per (weights, classes, templates): a second model with
the same identity reads them instead of running the text tower; another identity, class list or template list does
not hit; training clears the identity (the weights change); a damaged cache file is recomputed."""
import pytest
import torch

import vilseg.vilseg as V
from vilseg.vilseg import ViLSeg, ViLSegConfig


def _model():
    torch.manual_seed(0)
    return ViLSeg(ViLSegConfig(model='vilseg-micro', n_clusters=4, head_hidden=16)).eval()


def test_class_embeddings_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv('VILSEG_CACHE', str(tmp_path))
    names, tmpl = [['star'], ['ring', 'donut']], ['a {}.', 'a photo of a {}.']
    m = _model(); m.ident = 'test:weights-a'
    first = m.class_embeddings(names, tmpl)
    files = list((tmp_path / 'text').glob('*.pt'))
    assert len(files) == 1
    calls = []
    real = V.text_features
    monkeypatch.setattr(V, 'text_features', lambda *a, **k: calls.append(1) or real(*a, **k))
    m2 = _model(); m2.ident = 'test:weights-a'
    assert torch.equal(m2.class_embeddings(names, tmpl), first) and not calls        # read from disk, no text tower
    m2.class_embeddings(names, tmpl[:1]); m2.class_embeddings(names[:1], tmpl)        # other templates, other classes: encoded
    assert len(calls) == 2 and len(list((tmp_path / 'text').glob('*.pt'))) == 3
    m3 = _model(); m3.ident = 'test:weights-b'; m3.class_embeddings(names, tmpl)      # other weights: encoded
    assert len(calls) == 3
    m4 = _model(); m4.class_embeddings(names, tmpl)                                   # no identity: no disk cache
    assert len(calls) == 4 and len(list((tmp_path / 'text').glob('*.pt'))) == 4
    files[0].write_bytes(b'damaged')                                                  # a damaged file is recomputed
    m5 = _model(); m5.ident = 'test:weights-a'
    assert torch.allclose(m5.class_embeddings(names, tmpl), first) and len(calls) == 5


def test_training_clears_the_identity():
    from torch.utils.data import default_collate
    from vilseg.views import MultiView, ViewConfig
    m = _model().train(); m.ident = 'test:weights-a'
    mv = MultiView(ViewConfig(global_size=32, local_size=16, n_local=1))
    b = default_collate([mv(i) for i in torch.randint(0, 255, (2, 3, 40, 40), dtype=torch.uint8)]); b['caption'] = ['a star', 'a ring']
    m(b, step=1)
    assert m.ident is None


def test_load_model_and_clip_baseline_set_an_identity(tmp_path):
    from vilseg.protocols import clip_baseline
    from vilseg.core import file_sha256
    from vilseg.encoders import create_clip
    clip, _ = create_clip('vilseg-micro')
    torch.save(clip.state_dict(), tmp_path / 'w.pt')
    m = clip_baseline('vilseg-micro', str(tmp_path / 'w.pt'))
    assert m.ident == f"open_clip:vilseg-micro:sha256:{file_sha256(tmp_path / 'w.pt')}"
    with pytest.warns(UserWarning, match='randomly initialised'):
        assert clip_baseline('vilseg-micro').ident is None
