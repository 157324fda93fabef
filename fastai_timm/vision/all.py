"""`fastai.vision.all` with fastai-timm's versions in place: change one import line to switch.

`from fastai_timm.vision.all import *` gives every name of `from fastai.vision.all import *`, with
`vision_learner`, `create_vision_model`, `create_timm_model`, `unet_learner`, `create_unet_model` and
`DynamicUnet` replaced by the versions that take timm names, plus `TimmBody`, `TimmUnet` and the timm
helpers of `fastai_timm.timm`. It also brings `Learner.export_model` (`fastai_timm.export`) and fastai's
distributed tools, patched by `fastai_timm.distributed` so that they and mixed precision run on CPUs."""
from fastai.vision.all import *
from fastai_timm.timm import *
from fastai_timm.vision.models.unet import *
from fastai_timm.vision.learner import *
from fastai_timm.export import *
from fastai_timm.distributed import *
