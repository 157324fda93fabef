"""Train a tiny timm U-Net on DSB2018 nuclei in each process that torchrun starts, and write what each rank saw.

Run by tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distrib_train.py --data DIR --out DIR

Each rank starts from different random weights (its own seed) and writes `rank<N>.json` to `--out`: the
SHA-256 of its parameters before and after training, the training indices it received, and the backend.
"""
import os
# huggingface_hub reads this when it is imported, so it must be set first: the test never reaches a weights hub.
os.environ['HF_HUB_OFFLINE'] = '1'

import argparse
import hashlib
import json
from pathlib import Path

import torch
from fastai_timm.vision.all import *


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, required=True, help='DSB2018 folder with images/, labels/, codes.txt, tiny.txt')
    p.add_argument('--out', type=Path, required=True, help='folder for the rank<N>.json files')
    p.add_argument('--n', type=int, default=16, help='number of images from tiny.txt; the last 4 are the validation set')
    p.add_argument('--size', type=int, default=64, help='side of the resized images, in pixels')
    p.add_argument('--bs', type=int, default=2, help='batch size before splitting between ranks')
    p.add_argument('--arch', default='test_resnet', help='timm encoder name')
    return p.parse_args()


def params_hash(model):
    h = hashlib.sha256()
    for p in model.parameters(): h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordIdxs(Callback):
    "Record the indices that this rank's training DataLoader hands out, each epoch"
    order = DistributedTrainer.order + 1 # after `DistributedTrainer` has wrapped the DataLoader

    def before_fit(self): self.epochs = []

    def before_train(self):
        dl = self.learn.dl
        if 'get_idxs' in vars(dl): return # already wrapped in an earlier epoch
        sample = dl.get_idxs
        def recorded():
            idxs = list(sample())
            self.epochs.append(idxs)
            return idxs
        dl.get_idxs = recorded


def main():
    args = parse_args()
    names = (args.data/'tiny.txt').read_text().split()[:args.n]
    codes = (args.data/'codes.txt').read_text().split()
    files = [args.data/'images'/n for n in names]
    block = DataBlock(blocks=(ImageBlock, MaskBlock(codes)), get_y=lambda f: args.data/'labels'/f.name,
                      splitter=IndexSplitter(range(args.n - 4, args.n)), item_tfms=Resize(args.size))
    dls = block.dataloaders(files, bs=args.bs, num_workers=0)

    rank = rank_distrib()
    torch.manual_seed(100 + rank) # different starting weights on each rank: DDP must copy rank 0's
    learn = unet_learner(dls, args.arch, pretrained=False, cbs=RecordIdxs())
    initial = params_hash(learn.model)
    with learn.distrib_ctx():
        learn.fit(1, 1e-3)
    train_items = learn.dls.train.items
    result = dict(rank=rank, world_size=num_distrib(), backend=torch.distributed.get_backend(),
                  initial=initial, final=params_hash(learn.model), epochs=learn.record_idxs.epochs,
                  files=[Path(train_items[i]).name for i in learn.record_idxs.epochs[0]], n_train=len(train_items),
                  losses=[float(l) for l in learn.recorder.losses])
    (args.out/f'rank{rank}.json').write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == '__main__': main()
