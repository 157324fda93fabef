"Multi-process training on CPUs with torchrun, bfloat16 autocast on the CPU, and channels_last on timm U-Nets."
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai_timm.vision.all import unet_learner, DistributedTrainer
from conftest import blob_dls

TESTS = Path(__file__).parent
DATA = TESTS.parent.parent/'shared'/'data'/'dsb2018-nuclei'


def test_torchrun_two_ranks_share_weights(tmp_path):
    assert (DATA/'tiny.txt').exists(), f'DSB2018 nuclei not found at {DATA.resolve()}'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(TESTS/'distrib_train.py'), '--data', str(DATA), '--out', str(tmp_path)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1))

    assert (r0['rank'], r1['rank']) == (0, 1)
    assert r0['world_size'] == r1['world_size'] == 2
    if not torch.cuda.is_available(): assert r0['backend'] == 'gloo'
    # Each rank started from its own random weights, trained on its own half of the data, and ended with the
    # same weights: DDP copied rank 0's weights at the start and averaged the gradients at every step.
    assert r0['initial'] != r1['initial']
    assert r0['final'] == r1['final']
    assert r0['final'] != r0['initial']
    seen0, seen1 = r0['epochs'][0], r1['epochs'][0]
    assert len(seen0) == len(seen1) == r0['n_train'] // 2
    assert set(seen0).isdisjoint(seen1)
    assert sorted(seen0 + seen1) == list(range(r0['n_train']))
    assert set(r0['files']).isdisjoint(r1['files'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU defaults apply when there is no CUDA')
def test_cpu_defaults():
    trainer = DistributedTrainer()
    assert trainer.sync_bn is False
    assert trainer.accelerator.device.type == 'cpu'
    with pytest.raises(ValueError, match='Pass `sync_bn=False`'):
        DistributedTrainer(sync_bn=True)


class RecordConvs(Callback):
    "Record output dtypes and the input and output memory layouts of every `Conv2d` during training batches"
    def before_fit(self):
        self.dtypes, self.layouts = set(), set()
        def layout(t):
            # A tensor with 1×1 maps (squeeze-and-excite) is contiguous in both layouts, so it counts as channels_last.
            return 'channels_last' if t.is_contiguous(memory_format=torch.channels_last) else 'contiguous'
        def hook(m, i, o):
            if not m.training: return
            self.dtypes.add(o.dtype)
            self.layouts.update([layout(i[0]), layout(o)])
        self.handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, nn.Conv2d)]

    def after_fit(self):
        for h in self.handles: h.remove()


@pytest.mark.parametrize('arch', ['test_resnet', 'test_mambaout'])
def test_bf16_autocast_on_cpu(arch):
    learn = unet_learner(blob_dls(), arch, pretrained=False, cbs=RecordConvs()).to_bf16()
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning) # torch warns when it disables autocast
        learn.fit(1, 1e-3)
    assert learn.record_convs.dtypes == {torch.bfloat16}, arch
    assert {p.dtype for p in learn.model.parameters()} == {torch.float32}, arch
    assert np.isfinite(learn.recorder.losses[-1].item()), arch


def test_fp16_on_cpu_warns_and_trains_fp32():
    learn = unet_learner(blob_dls(), 'test_resnet', pretrained=False, cbs=RecordConvs()).to_fp16()
    with pytest.warns(UserWarning, match=r'Use `learn.to_bf16\(\)`'):
        learn.fit(1, 1e-3)
    assert learn.record_convs.dtypes == {torch.float32}


@pytest.mark.parametrize('arch', ['test_convnext', 'test_efficientnet'])
def test_channels_last(arch):
    dls = blob_dls()
    learn = unet_learner(dls, arch, pretrained=False, cbs=RecordConvs())
    learn.to_channelslast(use_amp=False)
    learn.fit(1, 1e-3)
    assert learn.record_convs.layouts == {'channels_last'}, arch
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in learn.model.parameters() if p.ndim == 4), arch
    xb, _ = dls.valid.one_batch()
    learn.model.eval()
    with torch.no_grad():
        y_last = learn.model(xb.contiguous(memory_format=torch.channels_last))
        learn.to_contiguous()
        y_default = learn.model(xb)
    assert torch.allclose(y_last, y_default, atol=1e-4), arch


def test_channels_last_with_bf16():
    learn = unet_learner(blob_dls(), 'test_resnet', pretrained=False, cbs=RecordConvs())
    learn.to_channelslast(amp_mode='bf16')
    learn.fit(1, 1e-3)
    assert learn.record_convs.dtypes == {torch.bfloat16}
    assert learn.record_convs.layouts == {'channels_last'}
