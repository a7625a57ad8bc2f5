"""ImageNet (ILSVRC-2012) classification with ResNet-50 and ResNet-101 v1.5, read from an
ImageNet-format folder the user gives (nothing is downloaded); see docs/imagenet.md."""

from localsgd.workloads.imagenet.resnet import ResNet, resnet50, resnet101
from localsgd.workloads.imagenet.workload import (
    ImageNetConfig,
    ImageNetWorkload,
    imagenet_resnet50,
    imagenet_resnet101,
)

__all__ = [
    "ImageNetConfig",
    "ImageNetWorkload",
    "ResNet",
    "imagenet_resnet50",
    "imagenet_resnet101",
    "resnet50",
    "resnet101",
]
