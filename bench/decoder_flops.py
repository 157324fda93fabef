"""Count the forward FLOPs per image of the fastai-timm U-Net's decoder and of smp's Unet decoder.

A decoder's count is the whole model's minus the encoder's, both counted by `torch.utils.flop_counter`
on one image. The counter counts convolutions and matrix products, not element-wise layers. Unlike times,
the counts do not depend on the machine.

    python bench/decoder_flops.py
    python bench/decoder_flops.py --encoders resnet34 --size 512
"""
import argparse, os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from torch.utils.flop_counter import FlopCounterMode


def gflops(model, size):
    "Forward GFLOPs of `model` on one `size`×`size` RGB image"
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(): model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def decoder_gflops(encoder, size):
    "Forward GFLOPs per image of the encoder alone and of each decoder, as a dict"
    import timm, segmentation_models_pytorch as smp
    from fastai_timm.vision.learner import create_unet_model
    ours = create_unet_model(encoder, 2, (size, size), pretrained=False)
    theirs = smp.Unet('tu-' + encoder, encoder_weights=None, classes=2)
    alone = gflops(timm.create_model(encoder, features_only=True, pretrained=False), size)
    return dict(encoder=encoder, size=size, encoder_gflops=round(alone, 2),
                fastai_timm_decoder=round(gflops(ours, size) - alone, 2), smp_decoder=round(gflops(theirs, size) - alone, 2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--encoders', nargs='+', default=['resnet34', 'convnext_tiny', 'efficientnet_b0'], help='timm encoder names')
    p.add_argument('--size', type=int, default=256, help='square input size in pixels')
    args = p.parse_args()
    print('| encoder | size | encoder GFLOPs | fastai-timm decoder | smp decoder |\n|---|---|---|---|---|')
    for enc in args.encoders:
        r = decoder_gflops(enc, args.size)
        print(f"| {r['encoder']} | {r['size']} | {r['encoder_gflops']} | {r['fastai_timm_decoder']} | {r['smp_decoder']} |")


if __name__ == '__main__': main()
