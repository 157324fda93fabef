"Shared fixtures: offline timm, synthetic segmentation data and locally saved weights."
import os
# Tests never reach a weights hub; huggingface_hub reads this when it is imported.
os.environ['HF_HUB_OFFLINE'] = '1'

import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fastai.vision.all import DataBlock, ImageBlock, MaskBlock, PILImage, PILMask, RandomSplitter, get_image_files


def write_blobs(path, n=8, size=64, seed=0):
    "Write `n` noisy images with one bright disc each and its 0/1 mask under `path`/images and `path`/labels"
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    (path/'images').mkdir(parents=True, exist_ok=True)
    (path/'labels').mkdir(exist_ok=True)
    for i in range(n):
        yy, xx = np.mgrid[:h, :w]
        cy, cx = int(rng.integers(h//4, 3*h//4)), int(rng.integers(w//4, 3*w//4))
        r = int(rng.integers(max(3, min(h, w)//10), max(4, min(h, w)//4)))
        mask = (((yy-cy)**2 + (xx-cx)**2) < r*r).astype(np.uint8)
        img = (rng.integers(0, 60, (h, w, 3)) + mask[..., None]*150).astype(np.uint8)
        PILImage.create(img).save(path/'images'/f'{i}.png')
        PILMask.create(mask).save(path/'labels'/f'{i}.png')
    return get_image_files(path/'images')


def blob_dls(size=64, bs=4, n=8, seed=0):
    "Segmentation DataLoaders over `write_blobs` images, classes background and blob"
    path = Path(tempfile.mkdtemp())
    files = write_blobs(path, n=n, size=size, seed=seed)
    block = DataBlock(blocks=(ImageBlock, MaskBlock(['background', 'blob'])), splitter=RandomSplitter(0.25, seed=0),
                      get_y=lambda f: f.parent.parent/'labels'/f.name)
    return block.dataloaders(files, path=path, bs=bs, num_workers=0)


@pytest.fixture
def make_dls(): return blob_dls


@pytest.fixture(scope='session')
def weights_dir():
    "A folder for state dicts saved once per session, so that `pretrained=True` works offline"
    return Path(tempfile.mkdtemp())


@pytest.fixture(scope='session')
def saved_weights(weights_dir):
    "Return a function that saves the random weights of a timm model once and returns their path"
    def _save(arch):
        path = weights_dir/f'{arch}.pth'
        if not path.exists():
            torch.manual_seed(0)
            torch.save(timm.create_model(arch).state_dict(), path)
        return path
    return _save
