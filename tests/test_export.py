"Export with the normalization inside: parity per format, the sidecar, bad paths, and torch.compile on the timm U-Net."
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, Normalize, RandomSplitter, load_learner, noop
from fastai_timm.export import load_exported, sidecar_path, deploy_model, normalize_stats, _SAVERS
from fastai_timm.timm import timm_stats
from fastai_timm.vision.all import unet_learner, vision_learner, create_unet_model
from conftest import blob_dls, write_blobs

FORMATS = ['torchscript', 'torch.export', 'onnx']


@pytest.fixture(autouse=True)
def _quiet_jit():
    # torch.jit.trace and torch.jit.load warn that TorchScript is deprecated, on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning, message='.*torch.jit')
        yield


def class_dls(tmp_path, size=64, bs=4):
    files = write_blobs(tmp_path, size=size)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), splitter=RandomSplitter(0.25, seed=0),
                      get_y=lambda f: 'odd' if int(f.stem) % 2 else 'even')
    return block.dataloaders(files, path=tmp_path, bs=bs, num_workers=0)


@pytest.fixture(scope='module')
def unet(saved_weights):
    learn = unet_learner(blob_dls(), 'test_convnext', weights=saved_weights('test_convnext'))
    learn.fit(1, 1e-3) # trained batch norms, so that eval mode differs from the initial state
    return learn


@pytest.fixture(scope='module')
def classifier(saved_weights, tmp_path_factory):
    learn = vision_learner(class_dls(tmp_path_factory.mktemp('cls')), 'test_resnet', weights=saved_weights('test_resnet'))
    learn.fit(1, 1e-3)
    return learn


def raw_preds_01(learn):
    "The learner's raw predictions on its validation set, and the same inputs scaled back to 0..1"
    inputs, preds, _ = learn.get_preds(dl=learn.dls.valid, act=noop, with_input=True)
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in normalize_stats(learn.dls))
    return preds.as_subclass(torch.Tensor), (inputs * std + mean).as_subclass(torch.Tensor)


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('kind', ['unet', 'classifier'])
def test_export_matches_get_preds(kind, fmt, request, tmp_path):
    learn = request.getfixturevalue(kind)
    expected, x01 = raw_preds_01(learn)
    path = learn.export_model(tmp_path/kind, fmt)
    predict, meta = load_exported(path)
    out = predict(x01)
    assert out.shape == expected.shape, (kind, fmt)
    err = (out - expected).abs().max().item()
    assert err <= 1e-5, f'{kind} {fmt}: max abs difference {err}'
    # The batch size is free: one image, and three times the validation batch.
    assert torch.allclose(predict(x01[:1]), expected[:1], atol=1e-5), (kind, fmt)
    assert predict(torch.cat([x01] * 3)).shape[0] == 3 * len(x01), (kind, fmt)


def test_sidecar_unet(unet, tmp_path):
    path = unet.export_model(tmp_path/'unet', 'torch.export')
    assert path == tmp_path/'unet.pt2'
    meta = json.loads(sidecar_path(path).read_text())
    mean, std = timm_stats(unet.model.encoder.model)
    assert meta['format'] == 'torch.export'
    assert meta['file'] == 'unet.pt2'
    assert meta['backbone'] == 'test_convnext'
    assert meta['vocab'] == ['background', 'blob']
    assert meta['input_size'] == [64, 64]
    assert meta['n_in'] == 3
    assert meta['normalized_inside'] is True
    assert meta['mean'] == pytest.approx(list(mean))
    assert meta['std'] == pytest.approx(list(std))
    assert meta['fastai_timm'] and meta['torch']


def test_sidecar_classifier(classifier, tmp_path):
    meta = load_exported(classifier.export_model(tmp_path/'cls.pt2', 'torch.export'))[1]
    assert meta['vocab'] == ['even', 'odd']
    assert meta['backbone'] == 'test_resnet'
    assert meta['file'] == 'cls.pt2'


def test_export_without_normalize(tmp_path):
    learn = unet_learner(blob_dls(), 'test_resnet', pretrained=False)
    assert normalize_stats(learn.dls) is None
    predict, meta = load_exported(learn.export_model(tmp_path/'raw', 'torch.export'))
    assert meta['mean'] is None
    assert meta['normalized_inside'] is False
    x = torch.rand(2, 3, 64, 64)
    learn.model.eval()
    with torch.no_grad(): expected = learn.model(x)
    assert torch.allclose(predict(x), expected, atol=1e-5)


def test_export_leaves_learner_alone(unet, tmp_path):
    unet.model.train()
    before = {k: v.clone() for k, v in unet.model.state_dict().items()}
    unet.export_model(tmp_path/'m', 'torch.export')
    assert unet.model.training
    assert all(torch.equal(before[k], v) for k, v in unet.model.state_dict().items())
    assert not deploy_model(unet).training


def test_export_after_load_learner_needs_img_size(unet, tmp_path):
    unet.export(tmp_path/'learner.pkl')
    loaded = load_learner(tmp_path/'learner.pkl')
    with pytest.raises(ValueError, match=r'Pass `img_size=\(height, width\)`'):
        loaded.export_model(tmp_path/'m', 'onnx')
    predict, meta = load_exported(loaded.export_model(tmp_path/'m', 'torch.export', img_size=(96, 80)))
    assert meta['input_size'] == [96, 80]
    assert meta['vocab'] == ['background', 'blob']
    x = torch.rand(2, 3, 96, 80)
    with torch.no_grad(): expected = deploy_model(unet)(x)
    assert torch.allclose(predict(x), expected, atol=1e-5)


# Bad input: a clear error, and nothing written.

def test_unknown_format(unet, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown export format 'tflite'. Use one of: 'torchscript', 'torch.export', 'onnx'"):
        unet.export_model(tmp_path/'m', 'tflite')
    assert list(tmp_path.iterdir()) == []


def test_suffix_of_other_format(unet, tmp_path):
    with pytest.raises(ValueError, match=r"m.onnx has the suffix of the 'onnx' format, but `fmt` is 'torch.export'"):
        unet.export_model(tmp_path/'m.onnx', 'torch.export')
    assert list(tmp_path.iterdir()) == []


def test_missing_folder(unet, tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        unet.export_model(tmp_path/'missing'/'m', 'onnx')
    assert list(tmp_path.iterdir()) == []


def test_parent_is_a_file(unet, tmp_path):
    (tmp_path/'file').write_text('x')
    with pytest.raises(NotADirectoryError, match='is a file, not a folder'):
        unet.export_model(tmp_path/'file'/'m', 'onnx')


def test_target_is_a_folder(unet, tmp_path):
    (tmp_path/'m.pt2').mkdir()
    with pytest.raises(IsADirectoryError, match='is a folder'):
        unet.export_model(tmp_path/'m', 'torch.export')
    assert [p.name for p in tmp_path.iterdir()] == ['m.pt2']


def test_folder_without_write_permission(unet, tmp_path, monkeypatch):
    # root may write anywhere, so the denial is simulated where the temporary file is created.
    def deny(*args, **kwargs): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr('fastai_timm.export.tempfile.mkstemp', deny)
    with pytest.raises(PermissionError, match='no permission to create files in'):
        unet.export_model(tmp_path/'m', 'onnx')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes to read-only folders')
def test_read_only_folder(unet, tmp_path):
    folder = tmp_path/'ro'
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match='no permission to create files in'):
            unet.export_model(folder/'m', 'onnx')
        assert list(folder.iterdir()) == []
    finally: folder.chmod(0o700)


@pytest.mark.parametrize('fmt', FORMATS)
def test_failed_export_leaves_no_file(unet, tmp_path, monkeypatch, fmt):
    def half_written(model, x, path):
        Path(path).write_bytes(b'partial')
        raise RuntimeError('exporter failed')
    monkeypatch.setitem(_SAVERS, fmt, half_written)
    with pytest.raises(RuntimeError, match='exporter failed'):
        unet.export_model(tmp_path/'m', fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_previous_file(unet, tmp_path, monkeypatch):
    path = unet.export_model(tmp_path/'m', 'torch.export')
    before = path.read_bytes(), sidecar_path(path).read_text()
    def failing(model, x, path): raise RuntimeError('exporter failed')
    monkeypatch.setitem(_SAVERS, 'torch.export', failing)
    with pytest.raises(RuntimeError, match='exporter failed'):
        unet.export_model(tmp_path/'m', 'torch.export')
    assert (path.read_bytes(), sidecar_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.pt2', 'm.pt2.json']


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['torch.export', 'onnx'])
def test_export_fastai_dynamic_unet(tmp_path, fmt):
    # fastai's own U-Net ends with `ToTensorBase`, which torch.export and ONNX cannot trace.
    from fastai.vision.models import resnet18
    learn = unet_learner(blob_dls(), resnet18, pretrained=False)
    learn.dls.add_tfms([Normalize.from_stats([0.5] * 3, [0.25] * 3)], 'after_batch')
    expected, x01 = raw_preds_01(learn)
    predict, _ = load_exported(learn.export_model(tmp_path/'tv', fmt))
    assert torch.allclose(predict(x01), expected, atol=1e-5)


# torch.compile: the whole U-Net is one graph, with no graph breaks.

def _compiled_matches_eager(arch, backend, size=64):
    model = create_unet_model(arch, 2, (size, size), pretrained=False).eval()
    x = torch.rand(2, 3, size, size)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        return (compiled(x) - model(x)).abs().max().item()


@pytest.mark.parametrize('arch', ['test_convnext', 'test_efficientnet', 'test_mambaout', 'test_coatnet'])
def test_compile_one_graph(arch):
    # `aot_eager` captures the graph and runs AOTAutograd's decompositions without generating code, so it is
    # quick. With fullgraph=True, compiling raises at the first graph break.
    assert _compiled_matches_eager(arch, 'aot_eager') <= 1e-6, arch


def test_compile_inductor_matches_eager():
    assert _compiled_matches_eager('test_resnet', 'inductor') <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['test_convnext', 'test_mambaout'])
def test_compile_inductor_more(arch):
    assert _compiled_matches_eager(arch, 'inductor') <= 1e-4, arch


def test_compile_training_step():
    model = create_unet_model('test_convnext', 2, (64, 64), pretrained=False).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.rand(2, 3, 64, 64)
    compiled(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
