"""`fastai.vision.all` with fastai-timm's versions in place: change one import line to switch.

`from fastai_timm.vision.all import *` gives every name of `from fastai.vision.all import *`, with
`vision_learner`, `create_vision_model`, `create_timm_model`, `unet_learner`, `create_unet_model` and
`DynamicUnet` replaced by the versions that take timm names, plus `TimmBody`, `TimmUnet` and the timm
helpers of `fastai_timm.timm`."""
from fastai.vision.all import *
from fastai_timm.timm import *
from fastai_timm.vision.models.unet import *
from fastai_timm.vision.learner import *
