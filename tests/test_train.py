"The `fastai-timm-train` command on small synthetic folders: outputs, split, seed, export check and bad input."
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import fastai_timm.train as train
from fastai_timm.train import main
from conftest import write_blobs

DSB = Path(__file__).resolve().parents[2]/'shared'/'data'/'dsb2018-nuclei'
FAST = dict(arch='test_resnet', size=32, bs=2, epochs=1, lr=1e-2)


@pytest.fixture
def folder(tmp_path):
    "Eight 64x64 blob images with masks and codes.txt"
    path = tmp_path/'blobs'
    write_blobs(path, n=8, size=64)
    (path/'codes.txt').write_text('background\nblob\n')
    return path


def leftovers(out):
    "Everything `main` may have left next to `out`: the folder itself and staging folders"
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f'.{out.name}.'))


def test_train_writes_complete_run(folder, tmp_path):
    out = tmp_path/'run'
    info = main(data=folder, out=out, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ['history.csv', 'metrics.json', 'model.pkl', 'results.png', 'valid.txt']
    assert leftovers(out) == ['run']
    saved = json.loads((out/'metrics.json').read_text())
    assert saved['arch'] == 'test_resnet'
    assert saved['size'] == 32
    assert saved['epochs'] == 1
    assert saved['classes'] == ['background', 'blob']
    assert set(saved['metrics']) == {'train_loss', 'valid_loss', 'dice_background', 'iou_background', 'dice_blob', 'iou_blob'}
    assert saved['train_time_s'] > 0
    assert saved['total_time_s'] >= saved['train_time_s']
    assert saved['export_max_diff'] <= 1e-5
    assert saved == json.loads(json.dumps(info))
    history = pd.read_csv(out/'history.csv')
    assert list(history.columns)[:3] == ['epoch', 'train_loss', 'valid_loss']
    assert len(history) == 1
    assert Image.open(out/'results.png').size[0] > 100


def test_main_prints_summary(folder, tmp_path, capsys):
    out = tmp_path/'run'
    info = main(data=folder, out=out, **FAST)
    printed = capsys.readouterr().out
    assert f"dice_blob {info['metrics']['dice_blob']:.3f}" in printed
    assert f"Validation on {info['n_valid']} images" in printed
    assert 'Exported learner reloaded' in printed
    assert printed.rstrip().endswith(str(out))


def test_relative_paths(folder, tmp_path, monkeypatch):
    "Relative --data and --out, as tools/train.sh passes them, resolve against the working directory"
    monkeypatch.chdir(tmp_path)
    main(data=Path('blobs'), out=Path('runs')/'blobs', **FAST)
    assert (tmp_path/'runs'/'blobs'/'model.pkl').is_file()
    assert not (folder/'runs').exists()


def test_train_learns_blobs(folder, tmp_path):
    info = main(data=folder, out=tmp_path/'run', **{**FAST, 'epochs': 4})
    assert info['metrics']['dice_blob'] > 0.5, info['metrics']
    assert info['metrics']['iou_blob'] < info['metrics']['dice_blob']


def test_valid_list_honored(folder, tmp_path):
    (tmp_path/'valid.txt').write_text('5.png\n1.png\n')
    info = main(data=folder, out=tmp_path/'run', valid=tmp_path/'valid.txt', **FAST)
    assert (tmp_path/'run'/'valid.txt').read_text().split() == ['1.png', '5.png']
    assert info['n_valid'] == 2
    assert info['n_train'] == 6


def test_seed_fixes_split_and_result(folder, tmp_path):
    runs = {name: main(data=folder, out=tmp_path/name, seed=seed, **FAST) for name, seed in [('a', 1), ('b', 1), ('c', 3)]}
    valid = {name: (tmp_path/name/'valid.txt').read_text() for name in runs}
    assert valid['a'] == valid['b']
    assert valid['a'] != valid['c']
    assert runs['a']['metrics'] == runs['b']['metrics']


def test_weights_fine_tune(folder, tmp_path, saved_weights):
    "Local weights make the run pretrained: one frozen epoch, then `epochs` unfrozen ones, all in history.csv"
    info = main(data=folder, out=tmp_path/'run', weights=saved_weights('test_resnet'), **FAST)
    assert info['pretrained'] is True
    history = pd.read_csv(tmp_path/'run'/'history.csv')
    assert list(history.epoch) == [0, 1]
    assert info['export_max_diff'] <= 1e-5


def test_threads_set_and_restored(folder, tmp_path):
    before = torch.get_num_threads()
    info = main(data=folder, out=tmp_path/'run', threads=1, **FAST)
    assert info['threads'] == 1
    assert json.loads((tmp_path/'run'/'metrics.json').read_text())['threads'] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize('setting,text', [(dict(size=0), '--size is 0'), (dict(epochs=0), '--epochs is 0'),
                                          (dict(bs=-1), '--bs is -1'), (dict(lr=-1e-3), '--lr is -0.001'),
                                          (dict(threads=-2), '--threads is -2'), (dict(valid_pct=1.5), '--valid-pct is 1.5')])
def test_bad_setting_raises(setting, text, folder, tmp_path):
    with pytest.raises(ValueError, match=re.escape(text)): main(data=folder, out=tmp_path/'run', **{**FAST, **setting})
    assert leftovers(tmp_path/'run') == []


def test_label_suffix_finds_masks(folder, tmp_path):
    for f in (folder/'labels').iterdir(): f.rename(f.with_name(f'{f.stem}_P.png'))
    with pytest.raises(FileNotFoundError, match='--label-suffix'): main(data=folder, out=tmp_path/'bad', **FAST)
    info = main(data=folder, out=tmp_path/'run', label_suffix='_P', **FAST)
    assert info['n_train'] + info['n_valid'] == 8


def _mask(value=0, shape=(64, 64)): return Image.fromarray(np.full(shape, value, np.uint8))


def _palette_mask(colours):
    "A mask of classes 0 and 1 stored as palette indices, with `colours` as the first two palette entries"
    mask = Image.fromarray(np.eye(64, dtype=np.uint8))
    mask.putpalette(list(colours) + [0]*(768 - len(colours)))
    assert mask.mode == 'P'
    return mask

# (case id, how the folder is broken, exception, text the message must contain)
BAD_INPUT = [
    ('mask_value_not_in_codes', lambda p: _mask(3).save(p/'labels'/'2.png'), ValueError, 'contains the pixel values [3]'),
    ('mask_value_255', lambda p: _mask(255).save(p/'labels'/'4.png'), ValueError, 'Add the missing class names'),
    ('image_without_mask', lambda p: (p/'labels'/'6.png').unlink(), FileNotFoundError, 'No mask found for 1 of 8 images'),
    ('sizes_differ', lambda p: _mask(0, (40, 64)).save(p/'labels'/'0.png'), ValueError, 'is 64x40 pixels but its image is 64x64'),
    ('rgb_mask', lambda p: Image.new('RGB', (64, 64)).save(p/'labels'/'1.png'), ValueError, "mode 'RGB'"),
    ('palette_mask', lambda p: _palette_mask((0, 0, 0, 255, 0, 0)).save(p/'labels'/'1.png'), ValueError, "mode 'P'"),
    ('unreadable_image', lambda p: (p/'images'/'3.png').write_bytes(b'truncated'), ValueError, 'Cannot read the image'),
    ('codes_missing', lambda p: (p/'codes.txt').unlink(), FileNotFoundError, 'codes.txt not found'),
    ('codes_one_class', lambda p: (p/'codes.txt').write_text('background\n'), ValueError, 'at least two'),
    ('images_empty', lambda p: [f.unlink() for f in (p/'images').iterdir()], FileNotFoundError, 'contains no image files'),
    ('images_missing', lambda p: shutil.rmtree(p/'images'), FileNotFoundError, 'images not found'),
    ('labels_missing', lambda p: shutil.rmtree(p/'labels'), FileNotFoundError, 'labels not found'),
    ('data_missing', lambda p: p.rename(p.with_name('elsewhere')), FileNotFoundError, 'Data folder'),
]


@pytest.mark.parametrize('case,edit,exc,text', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_before_training(case, edit, exc, text, folder, tmp_path, monkeypatch):
    edit(folder)
    def no_training(*args, **kwargs): raise AssertionError('a model was built before the input was checked')
    monkeypatch.setattr(train, 'unet_learner', no_training)
    out = tmp_path/'run'
    with pytest.raises(exc, match=re.escape(text)): main(data=folder, out=out, **FAST)
    assert leftovers(out) == []


def test_grey_palette_mask_accepted(folder, tmp_path):
    "A palette mask whose palette is the grey ramp reads as its indices in fastai, so it trains"
    _palette_mask((0, 0, 0, 1, 1, 1)).save(folder/'labels'/'1.png')
    info = main(data=folder, out=tmp_path/'run', **FAST)
    assert info['n_train'] + info['n_valid'] == 8


def test_bad_valid_list(folder, tmp_path):
    (tmp_path/'valid.txt').write_text('1.png\nnot_there.png\n')
    with pytest.raises(ValueError, match='not_there.png'): main(data=folder, out=tmp_path/'run', valid=tmp_path/'valid.txt', **FAST)
    with pytest.raises(FileNotFoundError, match='one image file name per line'):
        main(data=folder, out=tmp_path/'run', valid=tmp_path/'absent.txt', **FAST)
    assert leftovers(tmp_path/'run') == []


def test_no_data_folder(tmp_path):
    with pytest.raises(ValueError, match='Pass --data'): main(out=tmp_path/'run')


def test_out_not_empty_needs_overwrite(folder, tmp_path):
    out = tmp_path/'run'
    out.mkdir()
    (out/'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='--overwrite'): main(data=folder, out=out, **FAST)
    assert (out/'notes.txt').read_text() == 'keep me'
    main(data=folder, out=out, overwrite=True, **FAST)
    assert not (out/'notes.txt').exists()
    assert (out/'model.pkl').exists()
    assert leftovers(out) == ['run']


def test_export_mismatch_raises(folder, tmp_path, monkeypatch):
    "A reloaded learner that predicts differently must stop the run and leave no output"
    real_load = train.load_learner
    def load_perturbed(fname):
        learn = real_load(fname)
        first = next(learn.model.parameters())
        first.data += 0.5
        return learn
    monkeypatch.setattr(train, 'load_learner', load_perturbed)
    out = tmp_path/'run'
    with pytest.raises(RuntimeError, match='predicts differently'): main(data=folder, out=out, **FAST)
    assert leftovers(out) == []


def test_console_script(folder, tmp_path):
    "The entry point as pip writes it: help with units, and a clean exit code on bad input"
    script = tmp_path/'fastai-timm-train'
    script.write_text('import sys\nfrom fastai_timm.train import main\nsys.exit(main())\n')
    help_text = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, check=True).stdout
    for words in ['--data', '--arch', 'in pixels', 'in images', '--valid', '--label-suffix', '--overwrite']:
        assert words in help_text, words
    (folder/'labels'/'0.png').unlink()
    res = subprocess.run([sys.executable, script, '--data', folder, '--out', tmp_path/'run'], capture_output=True, text=True)
    assert res.returncode != 0
    assert 'No mask found for 1 of 8 images' in res.stderr
    assert str(folder/'labels'/'0.png') in res.stderr
    assert not (tmp_path/'run').exists()


@pytest.mark.slow
@pytest.mark.skipif(not DSB.is_dir(), reason=f'the DSB2018 nuclei are not at {DSB}')
def test_dsb2018_tiny_one_epoch(tmp_path):
    "The 40 images of tiny.txt, linked into a folder of their own, with the default encoder for one epoch"
    data = tmp_path/'tiny'
    for sub in ('images', 'labels'): (data/sub).mkdir(parents=True)
    for name in (DSB/'tiny.txt').read_text().split():
        for sub in ('images', 'labels'): (data/sub/name).symlink_to(DSB/sub/name)
    (data/'codes.txt').symlink_to(DSB/'codes.txt')
    info = main(data=data, out=tmp_path/'run', size=64, epochs=1)
    assert info['n_valid'] == 8
    assert info['export_max_diff'] <= 1e-5
    assert 0 <= info['metrics']['dice_nucleus'] <= 1
    assert Image.open(tmp_path/'run'/'results.png').mode in ('RGB', 'RGBA')
