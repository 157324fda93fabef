"""A U-Net on a fixed subset of timm families: one small model per pyramid shape or sizing rule.

`bench/coverage.py` sweeps one model of every timm module; this is the part of that sweep that runs in the
test suite. Each case builds the U-Net with random weights at a small size, runs it at that size and at an
odd one, takes one training step and builds it for one input channel.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from fastai.torch_core import norm_types
from fastai_timm.vision.all import create_unet_model, unet_learner, SimpleFeaturePyramid

SIZE, ODD = (64, 64), (67, 71)

# (timm name, strides of the levels the U-Net uses, layout of the encoder's maps); the test ids are the timm names.
CASES = [
    pytest.param('test_vit', [4, 8, 16, 32], 'NCHW', id='test_vit'),  # flat at 16: the neck adds 4, 8 and 32
    pytest.param('vit_tiny_patch16_224', [4, 8, 16, 32], 'NCHW', id='vit_tiny_patch16_224'),
    pytest.param('eva02_tiny_patch14_224', [3.5, 7, 14, 28], 'NCHW', id='eva02_tiny_patch14_224'),  # flat at 14
    pytest.param('xcit_nano_12_p8_224', [2, 4, 8, 16], 'NCHW', id='xcit_nano_12_p8_224',  # flat at 8, one size only
                 marks=pytest.mark.slow),
    pytest.param('levit_128s', [16, 32, 64], 'NCHW', id='levit_128s'),  # coarse start, one size only
    pytest.param('crossvit_tiny_240', [12, 17], 'NCHW', id='crossvit_tiny_240',  # strides that do not divide
                 marks=pytest.mark.slow),
    pytest.param('test_maxvit', [2, 4, 8, 16, 32], 'NCHW', id='test_maxvit'),  # one size only
    pytest.param('test_coatnet', [2, 4, 8, 16, 32], 'NCHW', id='test_coatnet'),
    pytest.param('vgg11', [1, 2, 4, 8, 16, 32], 'NCHW', id='vgg11'),  # a full-resolution skip
    pytest.param('test_mambaout', [4, 8, 16, 32], 'NHWC', id='test_mambaout'),
    pytest.param('swin_tiny_patch4_window7_224', [4, 8, 16, 32], 'NHWC', id='swin_tiny_patch4_window7_224',
                 marks=pytest.mark.slow),
]


def _unet(arch, size, n_in=3):
    return create_unet_model(arch, 2, size, pretrained=False, n_in=n_in)


def _run(model, size, n_in=3):
    model.eval()
    with torch.no_grad(): return model(torch.randn(1, n_in, *size))


@pytest.mark.parametrize('arch,strides,layout', CASES)
def test_pyramid_and_sizes(arch, strides, layout):
    model = _unet(arch, SIZE)
    assert [model.encoder.levels[i].stride for i in model.keep] == strides, arch
    assert model.encoder.fmt == layout, arch
    flat = len(set(model.encoder.model.feature_info.reduction())) == 1
    assert isinstance(model.encoder.neck, SimpleFeaturePyramid) == flat, arch
    assert _run(model, SIZE).shape == (1, 2, *SIZE), arch

    # An encoder locked to its build size is rebuilt for the data's size, as `unet_learner` does.
    odd = _unet(arch, ODD) if model.locked_img_size is not None else model
    assert _run(odd, ODD).shape == (1, 2, *ODD), arch


@pytest.mark.parametrize('arch,strides,layout', CASES)
def test_train_step(arch, strides, layout):
    torch.manual_seed(0)
    model = _unet(arch, SIZE).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    first = next(model.encoder.model.parameters())
    last = model.head[0].weight
    before = last.detach().clone()
    loss = F.cross_entropy(model(torch.randn(2, 3, *SIZE)), torch.randint(0, 2, (2, *SIZE)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), arch
    assert first.grad is not None and first.grad.abs().sum() > 0, f'{arch}: no gradient reaches the encoder'
    assert not torch.equal(last.detach(), before), arch


@pytest.mark.parametrize('arch,strides,layout', CASES)
def test_one_channel(arch, strides, layout):
    model = _unet(arch, ODD, n_in=1)
    assert model.encoder.n_in == 1, arch
    assert _run(model, ODD, n_in=1).shape == (1, 2, *ODD), arch


def test_flat_neck_trains_while_frozen(make_dls, saved_weights):
    learn = unet_learner(make_dls(size=64), 'test_vit', weights=saved_weights('test_vit'))
    neck = list(learn.model.encoder.neck.parameters())
    assert neck and all(p.requires_grad for p in neck)
    assert {id(p) for p in neck} <= {id(p) for p in learn.opt.param_groups[-1]['params']}
    enc = learn.model.encoder.model
    norm_ids = {id(p) for m in enc.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    assert {id(p) for p in enc.parameters() if p.requires_grad} == norm_ids


def test_patch14_at_pretrained_size():
    "224 is a multiple of 14 but not of 28, the stride the U-Net pads to"
    arch = 'eva02_tiny_patch14_224'
    native = tuple(timm.get_pretrained_cfg(arch).to_dict()['input_size'][-2:])
    model = _unet(arch, native)
    assert model.min_size == 28
    assert _run(model, native).shape == (1, 2, *native)


def test_crossvit_larger_than_pretrained_raises():
    with pytest.raises(ValueError, match=r'at most 240×240'):
        _unet('crossvit_tiny_240', (256, 256))


def test_square_only_family_falls_back_to_pretrained_size():
    "NesT takes square inputs only, which no metadata says: 201×179, padded to 208×192, is padded to 224×224 instead"
    with pytest.warns(UserWarning, match=r"does not run at 208×192 .* padded to it"):
        model = _unet('nest_tiny', (201, 179))
    assert model.locked_img_size == (224, 224)
    assert _run(model, (201, 179)).shape == (1, 2, 201, 179)


def test_square_only_family_larger_size_raises():
    with pytest.raises(ValueError, match=r"does not run at 256×224 .* pretrained at 224×224"):
        _unet('nest_tiny', (256, 224))


def test_rgb_only_stem_gets_channel_adapter():
    "CSATv2's stem takes the DCT of YCbCr blocks, so one channel reaches it through a 1×1 convolution"
    with pytest.warns(UserWarning, match=r'1×1 convolution maps the input to 3 channels'):
        model = _unet('csatv2', SIZE, n_in=1)
    assert model.encoder.adapter.in_channels == 1
    assert model.encoder.adapter.out_channels == 3
    assert _run(model, SIZE, n_in=1).shape == (1, 2, *SIZE)
