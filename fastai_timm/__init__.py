"""Any timm backbone, by name, in every fastai vision learner: classifiers and U-Nets

Modules:

- `fastai_timm.vision.all`: `fastai.vision.all` with fastai-timm's versions in place: change one import line to switch."""

__version__ = "0.1.0"
