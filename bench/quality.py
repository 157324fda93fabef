"""Train the fastai-timm U-Net and smp's Unet on DSB2018 with the same budget, and compare their Dice.

Both models use the same timm encoder from random weights (no weights hub is reachable here), the same
DataLoaders, image size, epochs, seed, loss (cross-entropy), optimizer (fastai's Adam with
`fit_one_cycle`) and learning rate. Only the decoder differs. The result goes to
`bench/results/quality.csv` and `.md`.

    python bench/quality.py --encoder resnet34 --size 128 --epochs 8 --seeds 42 43
"""
import argparse, csv, os, platform, statistics, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, RandomSplitter, Resize, Flip, Learner, Dice, JaccardCoeff,
                               CrossEntropyLossFlat, get_image_files, get_c, set_seed, PILImage, ResizeMethod)
import segmentation_models_pytorch as smp
import torch
from fastai_timm.vision.learner import unet_learner

DATA = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'dsb2018-nuclei'
RESULTS = Path(__file__).parent/'results'


class RGB(PILImage):
    "A PIL image opened as RGB, since DSB2018 images are RGBA with a constant alpha"
    @classmethod
    def create(cls, fn, **kwargs): return super().create(fn, mode='RGB', **kwargs)


def make_dls(data, size, bs, seed, n_images):
    files = get_image_files(data/'images')
    if n_images: files = files[:n_images]
    codes = (data/'codes.txt').read_text().split()
    block = DataBlock(blocks=(ImageBlock(RGB), MaskBlock(codes)), get_y=lambda f: data/'labels'/f.name,
                      splitter=RandomSplitter(0.2, seed=seed), item_tfms=Resize(size, method=ResizeMethod.Squish),
                      batch_tfms=[Flip()])
    return block.dataloaders(files, bs=bs, num_workers=0)


def train(kind, encoder, dls, epochs, lr, seed):
    "Train one contender and return its final validation Dice and IoU for the nucleus class, and the seconds taken"
    set_seed(seed, reproducible=True)
    metrics = [Dice(), JaccardCoeff()]
    if kind == 'fastai_timm':
        learn = unet_learner(dls, encoder, pretrained=False, normalize=False, loss_func=CrossEntropyLossFlat(axis=1), metrics=metrics)
    else:
        model = smp.Unet('tu-' + encoder, encoder_weights=None, classes=get_c(dls))
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(axis=1), metrics=metrics)
    set_seed(seed, reproducible=True)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
        seconds = time.perf_counter() - t0
        _, dice, iou = learn.validate()
    return dict(contender=kind, encoder=encoder, seed=seed, dice=round(float(dice), 4), iou=round(float(iou), 4),
                seconds=round(seconds, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', type=Path, default=DATA, help='folder with images/, labels/ and codes.txt')
    p.add_argument('--encoder', default='resnet34', help='timm encoder name for both contenders')
    p.add_argument('--size', type=int, default=128, help='training image size in pixels (square)')
    p.add_argument('--epochs', type=int, default=8, help='epochs of fit_one_cycle')
    p.add_argument('--bs', type=int, default=8, help='batch size')
    p.add_argument('--lr', type=float, default=3e-3, help='maximum learning rate of fit_one_cycle')
    p.add_argument('--seeds', type=int, nargs='+', default=[42], help='seeds for the split, the init and the shuffling. '
                   'Each seed trains both contenders, and the gap is taken between their mean Dice')
    p.add_argument('--n-images', type=int, default=0, help='use the first N images only (0: all)')
    p.add_argument('--out', type=Path, default=RESULTS/'quality', help='path prefix of the CSV and Markdown results')
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for seed in args.seeds:
        for kind in ('fastai_timm', 'smp'):
            dls = make_dls(args.data, args.size, args.bs, seed, args.n_images)
            rows.append(train(kind, args.encoder, dls, args.epochs, args.lr, seed))
            print(rows[-1], flush=True)
    mean = {k: statistics.mean(r['dice'] for r in rows if r['contender'] == k) for k in ('fastai_timm', 'smp')}
    gap = mean['fastai_timm'] - mean['smp']
    md = (f"Encoder {args.encoder}, random init, {args.size}x{args.size}, {args.epochs} epochs, bs {args.bs}, lr {args.lr}, "
          f"seeds {', '.join(map(str, args.seeds))}, {platform.machine()} with {os.cpu_count()} cores.\n\n"
          "| contender | seed | Dice nucleus | IoU nucleus | train s |\n|---|---|---|---|---|\n"
          + '\n'.join(f"| {r['contender']} | {r['seed']} | {r['dice']} | {r['iou']} | {r['seconds']} |" for r in rows)
          + f"\n\nMean Dice: fastai-timm {mean['fastai_timm']:.4f}, smp {mean['smp']:.4f}; fastai-timm minus smp: {gap:+.4f}\n")
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix('.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    args.out.with_suffix('.md').write_text(md)


if __name__ == '__main__': main()
