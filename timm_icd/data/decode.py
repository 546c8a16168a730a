"""Decoding for the per-sample input paths: images opened without decoding, JPEGs decoded at a reduced DCT scale when
the random crop allows it, and (streaming, ``--decode-device cuda``) JPEG batches decoded on the device.

**Opened, not decoded.** ``open_image`` gives what ``datasets.Image().decode_example`` gives (EXIF orientation
applied, the feature's mode), but leaves a JPEG's pixels undecoded until the transform needs them: PIL reads the size
and mode from the header. (An image with an EXIF rotation is decoded at once, as datasets must turn its pixels.)

**Reduced decoding** (``--decode-scale auto``, the default). timm's train transform begins with a random resized crop:
a box drawn on the image's size and resized to the output. libjpeg decodes at 1/2, 1/4 or 1/8 scale through DCT
scaling (PIL's ``Image.draft``) for a fraction of the cost. ``ReducedDecodeCrop`` draws the box exactly as timm does
(timm's ``get_params`` on the header size, then the interpolation), picks the coarsest scale whose crop still has
at least the output's pixels in each direction (``decode_factor``), decodes at that scale and resizes the crop,
mapped into the scaled image, to the output with the same interpolation (PIL's antialiased resize). The random draws
are timm's, so the flips and everything after see the same numbers; only the pixels differ, slightly (the scaled
IDCT averages blocks of pixels, then the resize shrinks less). Only an unloaded JPEG in RGB mode is eligible; any
other image (PNG, greyscale or CMYK JPEG, an image already decoded) decodes in full, as before. At 224 px a 500x375
photograph never qualifies (a 2x reduction needs a crop of at least 448x448 px); large photographs often do.

**Decoding on the device** (``--decode-device cuda``, streaming only). The workers read each JPEG's header and make
the CPU path's draws with the sample's seeded RNG (``draw_crop``), and return the undecoded bytes with the draws; the
main process decodes the batch with ``torchvision.io.decode_jpeg`` on the device and crops, resizes (antialiased,
PIL's kernels) and flips each image there (``decode_on_device``). The same code runs with ``device='cpu'``, which is
how it is tested and benchmarked without a GPU. Images it cannot take (not an RGB JPEG, an EXIF rotation) go through
the CPU path in the worker and join the batch in their place.
"""
import io
import logging
import random
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps
from timm.data import create_transform
from timm.data.transforms import (
    MaybePILToTensor, RandomResizedCropAndInterpolation, interp_mode_to_str, str_to_pil_interp)
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import Compose, RandomHorizontalFlip, RandomVerticalFlip

from .augment import AugmentConfig

_logger = logging.getLogger(__name__)

DECODE_SCALES = ('auto', 'off')
FACTORS = (8, 4, 2)  # the DCT scales libjpeg decodes at, coarsest first
JPEG_FORMATS = ('JPEG', 'MPO')  # PIL names camera JPEGs with a preview image MPO
DEVICE_INTERPOLATIONS = ('random', 'bilinear', 'bicubic')


def decode_factor(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest k in (8, 4, 2) such that the crop at 1/k scale still has the output's pixels in both directions
    (``crop_w / k >= out_w`` and ``crop_h / k >= out_h``); 1 when none does (decode in full)."""
    return next((k for k in FACTORS if crop_w >= k * out_w and crop_h >= k * out_h), 1)


def read_bytes(value: dict) -> Optional[bytes]:
    """The encoded bytes of a datasets image value ({'bytes', 'path'}): embedded, or read from a local file; None for
    a remote path (datasets reads it, with its tokens)."""
    if value.get('bytes') is not None:
        return value['bytes']
    path = value.get('path')
    if path is None:
        return None
    try:  # no isfile() first: one system call fewer per image
        with open(path, 'rb') as f:
            return f.read()
    except (OSError, ValueError):  # datasets opens it and raises the error a user expects
        return None


def stack_images(images: Sequence[Any]) -> torch.Tensor:
    """A batch of uint8 images (tensors or arrays, one shape, any strides) as one contiguous N x C x H x W tensor.

    timm's per-sample transforms end in C x H x W views of H x W x C pixels; numpy copies such strided views into a
    contiguous batch about three times faster than ``torch.stack`` or timm's ``fast_collate`` (0.07-0.13 against
    0.24-0.31 and 0.31 CPU-ms per 224 px image on one thread, this project's 2-core AMD EPYC), and collation was the
    largest cost the loader did not share with timm's (``benchmarks/results/loader_profile.md``). In a DataLoader
    worker the batch is written into shared memory, as ``default_collate`` does, so it reaches the main process
    without another copy. Anything else (other dtypes or shapes) goes to ``torch.stack``.
    """
    arrays = [np.asarray(image) for image in images]
    if not arrays or any(a.dtype != np.uint8 or a.shape != arrays[0].shape for a in arrays):
        return torch.stack([torch.as_tensor(image) for image in images])
    shape, numel = (len(arrays), *arrays[0].shape), len(arrays) * arrays[0].size
    if torch.utils.data.get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:  # default_collate's way to a tensor in shared memory
        out = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(numel)).view(shape)
    np.stack(arrays, out=out.numpy())
    return out


def collate_images(batch: Sequence[tuple]) -> list:
    """``default_collate`` of (image, label, ...) samples, the uint8 images stacked by ``stack_images``."""
    return [stack_images([sample[0] for sample in batch]),
            *torch.utils.data.default_collate([sample[1:] for sample in batch])]


def open_image(value: Any, mode: Optional[str] = None) -> Any:
    """An image column's value as ``datasets.Image(mode=mode).decode_example`` returns it, with a JPEG's pixels left
    undecoded; a value that is no encoded image (a PIL image, an array) is returned as it is."""
    if isinstance(value, str):
        value = {'path': value, 'bytes': None}
    if not isinstance(value, dict):
        return value
    data = read_bytes(value)
    if data is None:  # a remote file, or a missing one (datasets raises the error a user expects)
        return datasets.Image(mode=mode).decode_example(value)
    image = Image.open(io.BytesIO(data))
    if image.getexif().get(ExifTags.Base.Orientation) not in (None, 1):  # datasets turns the pixels upright
        image = ImageOps.exif_transpose(image)
    if mode and image.mode != mode:
        image = image.convert(mode)
    return image


def reducible(image: Any) -> bool:
    """Whether ``image`` can still be decoded at a reduced scale: an RGB JPEG whose pixels are not decoded yet."""
    return (isinstance(image, Image.Image) and image.format in JPEG_FORMATS and image.mode == 'RGB'
            and len(getattr(image, 'tile', ())) == 1 and not getattr(image, 'decoderconfig', ()))


class ReducedDecodeCrop(RandomResizedCropAndInterpolation):
    """timm's ``RandomResizedCropAndInterpolation`` that decodes an unloaded RGB JPEG at the coarsest DCT scale whose
    crop keeps at least the output's pixels; other images are cropped exactly as timm does."""

    @classmethod
    def from_timm(cls, crop: RandomResizedCropAndInterpolation) -> 'ReducedDecodeCrop':
        """The same crop (size, scale, ratio, interpolation) as ``crop``."""
        new = cls.__new__(cls)
        new.__dict__.update(crop.__dict__)
        return new

    def draw(self, img: Image.Image) -> Tuple[int, int, int, int, TF.InterpolationMode]:
        """timm's draws in timm's order: the box (top, left, height, width) on the image's size, then the
        interpolation (Python's ``random``, as timm)."""
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        interpolation = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) \
            else self.interpolation
        return i, j, h, w, interpolation

    def factor(self, img: Image.Image, height: int, width: int) -> int:
        """The scale 1/k a crop of ``height`` x ``width`` px of ``img`` decodes at (1: in full)."""
        return decode_factor(width, height, self.size[1], self.size[0]) if reducible(img) else 1

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w, interpolation = self.draw(img)
        k = self.factor(img, h, w)
        full_width = img.width
        drafted = img.draft('RGB', (img.width // k, img.height // k)) if k > 1 else None
        if drafted is None:
            return TF.resized_crop(img, i, j, h, w, self.size, interpolation)  # timm's own call
        scale = full_width / drafted[1][2]  # the scale libjpeg decodes at: (0, 0, W / scale, H / scale)
        box = (j / scale, i / scale, min((j + w) / scale, img.width), min((i + h) / scale, img.height))
        return img.resize((self.size[1], self.size[0]), str_to_pil_interp(interp_mode_to_str(interpolation)), box=box)


def create_train_transform(data_config: dict, augment: AugmentConfig, decode_scale: str = 'auto',
                           jitter_in_workers: bool = False) -> Compose:
    """timm's train transform for the per-sample paths, ending in uint8 (``use_prefetcher``).

    Args:
        data_config: The student's data config.
        augment: timm's augmentation flags.
        decode_scale: 'auto' replaces timm's random resized crop by ``ReducedDecodeCrop``; 'off' keeps timm's.
        jitter_in_workers: Keep timm's colour jitter in the transform; by default the device batch applies it
            (``InputStage``), and the transform does only decode, crop, resize and flip.
    """
    transform = create_transform(
        **{**data_config, 'interpolation': augment.train_interpolation}, is_training=True, no_aug=augment.no_aug,
        scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip, vflip=augment.vflip,
        color_jitter=augment.color_jitter if jitter_in_workers else None, auto_augment=augment.aa,
        use_prefetcher=True)
    if decode_scale == 'auto' and type(transform.transforms[0]) is RandomResizedCropAndInterpolation:
        transform.transforms[0] = ReducedDecodeCrop.from_timm(transform.transforms[0])
    return transform


def device_decode_reason(augment: AugmentConfig) -> Optional[str]:
    """Why ``--decode-device cuda`` cannot apply these flags (it does timm's crop and flips only), or None."""
    if augment.no_aug:
        return '--no-aug (its resize and centre crop run on PIL images)'
    if augment.aa:
        return f'--aa {augment.aa} (AutoAugment/RandAugment run per sample on PIL images)'
    if augment.train_interpolation not in DEVICE_INTERPOLATIONS:
        return f'--train-interpolation {augment.train_interpolation} (the device resizes bilinear or bicubic)'
    return None


@dataclass(frozen=True)
class CropDraw:
    """One sample's draws for the device: the crop box on the full image, the interpolation and the flips."""
    top: int
    left: int
    height: int
    width: int
    interpolation: str
    hflip: bool
    vflip: bool


@dataclass(frozen=True)
class DeviceJpeg:
    """What a worker returns for a JPEG the device decodes: its bytes, its draws, and where it came from."""
    data: bytes
    draw: CropDraw
    where: str


def draw_crop(transform: Compose, image: Image.Image) -> CropDraw:
    """The draws ``transform`` (crop, flips, uint8: ``create_train_transform`` with ``device_decode_reason`` None)
    makes for ``image``, in its order and from the same RNGs, without decoding the image. Run it seeded as the
    transform would be."""
    crop, *flips = transform.transforms[:-1]
    if not isinstance(crop, RandomResizedCropAndInterpolation) or not isinstance(transform.transforms[-1],
                                                                                 MaybePILToTensor):
        raise ValueError(f'not a crop-and-flip transform: {transform}')
    i, j, h, w, interpolation = ReducedDecodeCrop.draw(crop, image)
    flipped = {RandomHorizontalFlip: False, RandomVerticalFlip: False}
    for step in flips:
        if type(step) not in flipped:
            raise ValueError(f'the device does not apply {type(step).__name__}')
        flipped[type(step)] = bool(torch.rand(1) < step.p)  # what torchvision's flips draw
    return CropDraw(i, j, h, w, interp_mode_to_str(interpolation), flipped[RandomHorizontalFlip],
                    flipped[RandomVerticalFlip])


def crop_resize(image: torch.Tensor, draw: CropDraw, size: Sequence[int]) -> torch.Tensor:
    """One decoded C x H x W uint8 image cropped, resized to ``size`` (H, W) with PIL's antialiasing kernels, rounded
    as PIL rounds, and flipped: what the CPU path's crop and flips make of it."""
    crop = image[None, :, draw.top:draw.top + draw.height, draw.left:draw.left + draw.width].float()
    out = F.interpolate(crop, size=tuple(size), mode=draw.interpolation, align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    dims = [d for d, flip in ((-1, draw.hflip), (-2, draw.vflip)) if flip]
    return out.flip(dims) if dims else out


def decode_on_device(items: List[Union[torch.Tensor, DeviceJpeg]], size: Sequence[int], device: torch.device,
                     skip_bad: bool = False) -> Tuple[torch.Tensor, List[int], List[str]]:
    """Stack a worker's batch on ``device``: JPEGs decoded there in one ``decode_jpeg`` call, then cropped and
    flipped; images the worker transformed itself (uint8 tensors) moved there, in their place.

    Returns the uint8 batch, the positions in ``items`` it holds, and where each JPEG that would not decode came from
    (``skip_bad``; otherwise such a JPEG raises ``ValueError`` naming it).
    """
    jpegs = [i for i, item in enumerate(items) if isinstance(item, DeviceJpeg)]
    data = [torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8) for i in jpegs]
    try:
        decoded = dict(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=device))) if jpegs else {}
    except RuntimeError:  # one bad JPEG fails the whole call: decode them one by one to find it
        decoded = {}
        for i, one in zip(jpegs, data):
            try:
                decoded[i] = decode_jpeg(one, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                if not skip_bad:
                    raise ValueError(f'cannot decode the JPEG{items[i].where} on {device}: {e}') from e
    out, kept, skipped = [], [], [items[i].where.strip(' ()') or 'a JPEG' for i in jpegs if i not in decoded]
    for i, item in enumerate(items):
        if isinstance(item, DeviceJpeg):
            if i not in decoded:
                continue
            out.append(crop_resize(decoded[i], item.draw, size))
        else:
            out.append(item.to(device, non_blocking=True))
        kept.append(i)
    return torch.stack(out) if out else torch.empty((0, 3, *size), dtype=torch.uint8, device=device), kept, skipped
