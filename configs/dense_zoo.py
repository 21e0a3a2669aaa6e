"""Factories for configs/dense.toml: torchvision segmentation models with random weights and no download.

TOML has no null, and torchvision's segmentation builders default `weights_backbone` to ImageNet
weights (a download), so the config calls these instead.
"""

from torchvision.models import segmentation


def fcn_resnet50(num_classes: int = 21):
    """FCN with a dilated ResNet-50 backbone (output stride 8), random weights."""
    return segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def deeplabv3_resnet50(num_classes: int = 21):
    """DeepLabv3 with a dilated ResNet-50 backbone and ASPP (image pooling included), random weights."""
    return segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                                           aux_loss=False)
