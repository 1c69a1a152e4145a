"""The paper's AlexNet (§3) and its two-device model-parallel form (§3.2)."""

from model.alexnet import AlexNet
from model.parallel import ModelParallelAlexNet

__all__ = ["AlexNet", "ModelParallelAlexNet"]
