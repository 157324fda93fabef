"Each fastai U-Net option changes the timm U-Net, and the model traces without hooks."
import pytest
import torch
from torch import nn
from fastai.layers import NormType, SelfAttention, SigmoidRange
from fastai_timm.vision.learner import create_unet_model
from fastai_timm.vision.models.unet import TimmUnet, TimmBody


def build(arch='test_resnet', **kwargs):
    torch.manual_seed(0)
    return create_unet_model(arch, 2, (64, 64), pretrained=False, **kwargs)


def kinds(model): return [type(m).__name__ for m in model.modules()]


def count(model, cls): return sum(isinstance(m, cls) for m in model.modules())


def test_blur_adds_blur_to_upsampling():
    assert count(build(blur=True), nn.AvgPool2d) > count(build(), nn.AvgPool2d)


def test_blur_final_controls_last_upsampling():
    # test_resnet's finest map is at stride 2, where the head runs: the last block upsamples last.
    with_final, without_final = build(blur=True), build(blur=True, blur_final=False)
    assert count(with_final.blocks[-1], nn.AvgPool2d) == 1
    assert count(without_final.blocks[-1], nn.AvgPool2d) == 0
    assert count(without_final.blocks[:-1], nn.AvgPool2d) == count(with_final.blocks[:-1], nn.AvgPool2d) > 0


def test_blur_final_controls_final_up():
    # test_convnext's finest map is at stride 4: `final_up` brings it to stride 2 after the last block.
    with_final, without_final = build('test_convnext', blur=True), build('test_convnext', blur=True, blur_final=False)
    assert count(with_final.final_up, nn.AvgPool2d) == 1
    assert count(without_final.final_up, nn.AvgPool2d) == 0
    assert count(without_final.blocks, nn.AvgPool2d) == count(with_final.blocks, nn.AvgPool2d) == len(with_final.blocks)


def test_self_attention_in_third_block_from_end():
    model = build(self_attention=True)
    assert count(model, SelfAttention) == 1
    assert count(model.blocks[-3], SelfAttention) == 1
    assert count(build(), SelfAttention) == 0


def test_y_range_bounds_output():
    model = build(y_range=(-1, 3)).eval()
    assert isinstance(model.y_range, SigmoidRange)
    out = model(torch.randn(2, 3, 64, 64) * 50)
    assert out.min() >= -1
    assert out.max() <= 3


def test_last_cross_merges_input():
    with_cross, without_cross = build(), build(last_cross=False)
    assert hasattr(with_cross, 'cross')
    assert not hasattr(without_cross, 'cross')
    # At stride 2 the image joins as its 2×2 patches: 4 channels for each of its 3.
    assert with_cross.head_stride == 2
    assert with_cross.head[0].in_channels == without_cross.head[0].in_channels + 3 * 4


def test_cross_sees_every_input_pixel():
    # Changing one pixel changes the prediction there, through the cross connection alone: the encoder and
    # decoder paths are cut by zeroing the decoder's output before the cross block.
    model = build().eval()
    model.final_up.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[0, :, 33, 17] += 5
    diff = (model(x) - model(y)).abs().sum(1)[0]
    assert diff[33, 17] > 0
    # Two 3×3 convolutions at stride 2 reach two 2×2 patches on each side of pixel 33's patch (rows 32-33).
    assert diff[:28].sum() == 0
    assert diff[38:].sum() == 0
    assert diff[28:38].sum() > 0


def test_head_starts_without_checkerboard():
    # ICNR init: the 4 pixels of each 2×2 patch that the head predicts start equal.
    model = build(last_cross=False).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.equal(out[..., 0::2, 0::2], out[..., 1::2, 1::2])
    assert torch.equal(out[..., 0::2, 0::2], out[..., 0::2, 1::2])
    model.head[0].bias.data.normal_()
    out = model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(out[..., 0::2, 0::2], out[..., 1::2, 1::2])


def test_vgg_head_stays_at_stride_1():
    # VGG's first map is at full resolution, so the last layers stay there.
    model = build('vgg11')
    assert model.head_stride == 1
    assert model.head[0].in_channels == 16 + 3
    assert model(torch.randn(1, 3, 67, 45)).shape == (1, 2, 67, 45)


def test_bottle_halves_cross_block():
    plain, bottle = build(), build(bottle=True)
    assert bottle.head[0].in_channels == plain.head[0].in_channels // 2
    assert bottle(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_act_cls_replaces_activations():
    model = build(act_cls=nn.SiLU)
    assert count(model.blocks, nn.SiLU) > 0
    assert count(model.blocks, nn.ReLU) == 0


def test_norm_type_adds_batchnorm_to_convs():
    plain, batch = build(), build(norm_type=NormType.Batch)
    assert count(batch.blocks, nn.BatchNorm2d) > count(plain.blocks, nn.BatchNorm2d)
    assert batch(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_widths_set_decoder_channels():
    model = build(widths=[64, 48, 40, 24, 20])
    assert [b.conv2[0].out_channels for b in model.blocks] == [48, 40, 24, 20]


def test_no_forward_hooks():
    model = build()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize('arch', ['test_resnet', 'test_convnext', 'test_mambaout'])
def test_trace_reproduces_output(arch):
    model = build(arch).eval()
    x = torch.randn(2, 3, 64, 64)
    traced = torch.jit.trace(model, x)
    assert torch.allclose(traced(x), model(x), atol=1e-5), arch


def test_torch_export_reproduces_output():
    model = build('test_convnext').eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_odd_locked_size_runs():
    # A locked size need not be even: the stride-2 head then covers one more pixel, cropped away.
    model = build().eval()
    model.locked_img_size = (63, 65)
    assert model(torch.randn(1, 3, 60, 61)).shape == (1, 2, 60, 61)
    assert model(torch.randn(1, 3, 63, 65)).shape == (1, 2, 63, 65)
