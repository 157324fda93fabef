"vision_learner and unet_learner on real timm backbones: normalization from the built model, arguments, errors."
import warnings

import numpy as np
import pytest
import timm
import torch
from fastai.vision.all import DataBlock, ImageBlock, CategoryBlock, RandomSplitter, Normalize, imagenet_stats
from fastai_timm.vision.all import vision_learner, unet_learner

from conftest import write_blobs


def cls_dls(tmp_path, size=64, batch_tfms=None):
    files = write_blobs(tmp_path, n=8, size=size)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), splitter=RandomSplitter(0.25, seed=0),
                      get_y=lambda f: 'odd' if int(f.stem) % 2 else 'even', batch_tfms=batch_tfms)
    return block.dataloaders(files, path=tmp_path, bs=4, num_workers=0)


def normalize_stats(dls):
    found = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    assert len(found) == 1, f'expected one Normalize, found {len(found)}'
    return tuple(found[0].mean.flatten().tolist()), tuple(found[0].std.flatten().tolist())


def test_convnext_tiny_local_weights(tmp_path, saved_weights):
    dls = cls_dls(tmp_path)
    learn = vision_learner(dls, 'convnext_tiny', weights=saved_weights('convnext_tiny'))
    mean, std = normalize_stats(dls)
    cfg = timm.get_pretrained_cfg('convnext_tiny')
    assert mean == pytest.approx(cfg.mean)
    assert std == pytest.approx(cfg.std)
    # The weights in the file are the ones in the model.
    saved = torch.load(saved_weights('convnext_tiny'))
    assert torch.equal(learn.model[0].model.stem[0].weight, saved['stem.0.weight'])


@pytest.mark.parametrize('arch,expected_mean', [
    pytest.param('vit_small_patch16_224.augreg_in21k', (0.5, 0.5, 0.5), id='vit_small_patch16_224.augreg_in21k'),
    pytest.param('vit_xsmall_patch16_clip_224.tinyclip_yfcc15m', (0.48145466, 0.4578275, 0.40821073),
                 id='vit_xsmall_patch16_clip_224.tinyclip_yfcc15m'),
])
def test_pretrained_tag_brings_its_stats(tmp_path, arch, expected_mean):
    path = tmp_path/'w.pth'
    torch.save(timm.create_model(arch, num_classes=0).state_dict(), path)
    dls = cls_dls(tmp_path)
    learn = vision_learner(dls, arch, weights=path)
    assert normalize_stats(dls)[0] == pytest.approx(expected_mean), arch
    assert learn.model(dls.one_batch()[0]).shape == (4, 2), arch


def test_imagenet_normalize_kept_with_warning(tmp_path, saved_weights):
    dls = cls_dls(tmp_path, batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    with pytest.warns(UserWarning, match=r'mean=\(0\.485, 0\.456, 0\.406\).*mean=\(0\.5, 0\.5, 0\.5\)'):
        vision_learner(dls, 'test_vit', weights=saved_weights('test_vit'))
    assert normalize_stats(dls)[0] == pytest.approx(imagenet_stats[0])


def test_matching_normalize_is_silent(tmp_path, saved_weights):
    dls = cls_dls(tmp_path, batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        vision_learner(dls, 'test_efficientnet', weights=saved_weights('test_efficientnet'))
    assert normalize_stats(dls)[0] == pytest.approx(imagenet_stats[0])


def test_torchvision_resnet18_as_upstream(tmp_path):
    from fastai.vision.models import resnet18
    import fastai.vision.learner as upstream
    ours_dls, theirs_dls = cls_dls(tmp_path/'a'), cls_dls(tmp_path/'b')
    ours = vision_learner(ours_dls, resnet18, pretrained=False)
    theirs = upstream.vision_learner(theirs_dls, resnet18, pretrained=False)
    assert [k for k in ours.model.state_dict()] == [k for k in theirs.model.state_dict()]
    assert len(ours.splitter(ours.model)) == len(theirs.splitter(theirs.model))
    assert [type(t) for t in ours_dls.after_batch.fs] == [type(t) for t in theirs_dls.after_batch.fs]


def test_unknown_name_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match='convnext_tiny'):
        vision_learner(cls_dls(tmp_path), 'convnext_tinyy', pretrained=False)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        vision_learner(cls_dls(tmp_path), 'test_resnet', weights=tmp_path/'nope.pth')


def test_weights_of_other_architecture(tmp_path, saved_weights):
    with pytest.raises(ValueError, match='do not fit'):
        unet_learner(cls_dls(tmp_path), 'test_resnet', n_out=2, weights=saved_weights('test_convnext'))


def test_download_failure_names_both_fixes(tmp_path):
    # HF_HUB_OFFLINE=1 (conftest) makes the download fail at once instead of reaching the network.
    with pytest.raises(RuntimeError, match=r'pretrained=False.*weights=<path'):
        vision_learner(cls_dls(tmp_path), 'test_resnet')
