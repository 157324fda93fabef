"The timm U-Net over one model of each pyramid shape: build, sizes, a training step, freezing and stats."
import numpy as np
import pytest
import timm
import torch
from fastai.torch_core import norm_types
from fastai_timm.timm import timm_param_groups, timm_stats, adapt_stats
from fastai_timm.vision.all import unet_learner, create_unet_model, TimmUnet, Normalize

# (timm name, pyramid shape); the test ids are the timm names.
PYRAMIDS = [
    pytest.param('test_resnet', 'strides 2 to 32', id='test_resnet'),
    pytest.param('test_efficientnet', 'strides 2 to 32, no output_fmt', id='test_efficientnet'),
    pytest.param('test_convnext', 'strides 4 to 32', id='test_convnext'),
    pytest.param('test_mambaout', 'strides 4 to 32, NHWC', id='test_mambaout'),
    pytest.param('test_nfnet', 'strides 2 to 32, weight-standardized convs', id='test_nfnet'),
    pytest.param('test_maxvit', 'strides 2 to 32, built for one size', id='test_maxvit'),
    pytest.param('test_coatnet', 'strides 2 to 32, built for one size', id='test_coatnet'),
    pytest.param('darknet17', 'strides 1 to 32', id='darknet17', marks=pytest.mark.slow),
    pytest.param('swin_tiny_patch4_window7_224', 'strides 4 to 32, NHWC, built for one size',
                 id='swin_tiny_patch4_window7_224', marks=pytest.mark.slow),
]


def _native(arch):
    return tuple(timm.get_pretrained_cfg(arch).to_dict()['input_size'][-2:])


@pytest.mark.parametrize('arch,shape', PYRAMIDS)
def test_unet_pyramid(arch, shape, make_dls, saved_weights):
    dls = make_dls(size=64)
    learn = unet_learner(dls, arch, weights=saved_weights(arch))
    model = learn.model
    assert isinstance(model, TimmUnet), arch

    # Normalization comes from the built encoder.
    norm = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    assert len(norm) == 1, arch
    expected = timm_stats(model.encoder.model)
    assert np.allclose(norm[0].mean.flatten().tolist(), expected[0]), arch

    # Output at the native size and at an odd size is the input's size. An encoder locked to its build size
    # takes that size and smaller ones; the native size is checked on a U-Net built for it.
    model.eval()
    locked = model.encoder.locked_img_size is not None
    sizes = [(64, 64), (61, 57)] if locked else [_native(arch), (67, 71)]
    with torch.no_grad():
        for h, w in sizes:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 2, h, w), f'{arch} at {h}x{w}'
        if locked:
            native = create_unet_model(arch, 2, _native(arch), pretrained=False).eval()
            h, w = _native(arch)
            assert native(torch.randn(1, 3, h, w)).shape == (1, 2, h, w), f'{arch} at its native size'
            with pytest.raises(ValueError, match=r'img_size=\(67, 71\)'): model(torch.randn(1, 3, 67, 71))

    # Frozen: only the decoder and the encoder's norm layers train.
    enc = model.encoder
    norm_ids = {id(p) for m in enc.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    trainable_enc = {id(p) for p in enc.parameters() if p.requires_grad}
    assert trainable_enc == norm_ids, arch
    dec = [p for n, p in model.named_parameters() if not n.startswith('encoder.')]
    assert all(p.requires_grad for p in dec), arch
    assert len(learn.opt.param_groups) == len(timm_param_groups(enc.model)) + 1, arch

    # One training step changes the decoder and leaves frozen encoder weights alone.
    frozen = next(p for p in enc.parameters() if id(p) not in norm_ids)
    before_frozen, before_head = frozen.detach().clone(), model.head[0].weight.detach().clone()
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.losses[-1].item()), arch
    assert torch.equal(frozen, before_frozen), arch
    assert not torch.equal(model.head[0].weight, before_head), arch

    learn.unfreeze()
    assert all(p.requires_grad for p in model.parameters()), arch


@pytest.mark.parametrize('n_in', [1, 3, 4])
@pytest.mark.parametrize('n_out', [1, 2, 5])
def test_unet_channels(n_in, n_out):
    from fastai_timm.vision.learner import create_unet_model
    model = create_unet_model('test_convnext', n_out, (64, 64), pretrained=False, n_in=n_in)
    assert model(torch.randn(2, n_in, 64, 64)).shape == (2, n_out, 64, 64)


def test_unet_stats_adapted_for_n_in(saved_weights):
    from fastai_timm.vision.learner import _timm_norm
    from fastai.vision.all import DataLoaders
    import tempfile
    from conftest import blob_dls
    dls = blob_dls()
    cfg = timm.create_model('test_efficientnet').pretrained_cfg
    _timm_norm(dls, cfg, True, n_in=4)
    norm = [t for t in dls.after_batch.fs if isinstance(t, Normalize)][0]
    assert norm.mean.flatten().tolist() == pytest.approx(adapt_stats((cfg['mean'], cfg['std']), 4)[0])
    assert norm.mean.numel() == 4
