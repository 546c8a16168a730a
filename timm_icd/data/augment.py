"""Batched, seeded augmentation on the device, for images decoded once and kept in memory.

timm's train transform (``RandomResizedCropAndInterpolation``, flips, ``ColorJitter``) runs per sample in Python on
PIL images. At 28-32 px that per-sample work costs more than the training step itself, so for datasets that fit in
memory this module applies the same augmentation family to a whole uint8 batch at once, with ``grid_sample``:

* random resized crop with timm's parameter draw (10 attempts of area in ``scale`` and log-uniform aspect ratio in
  ``ratio``, else a centre crop), resized with bilinear or bicubic interpolation (``random`` picks one per sample,
  as timm does);
* horizontal and vertical flips;
* brightness, contrast and saturation jitter with factors in [1 - cj, 1 + cj], in a random order per sample (as
  torchvision's ``ColorJitter``).

Every random number of a sample is a counter-based hash (splitmix64) of (seed, epoch, sample index, draw number),
computed on the device: augmentation is a pure function of those, whatever the batch, process count or resume point,
and no random state is drawn from or synced with the host. Unlike PIL, ``grid_sample`` does not antialias when a crop
is shrunk; at the sizes this path serves (crops resized up or kept), that does not arise.
"""
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import math
import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SUPPORTED_INTERPOLATIONS = ('random', 'bilinear', 'bicubic')
DRAWS = 32  # random numbers per sample: 10 x (area, ratio), 2 crop offsets, 2 flips, interpolation, 3 jitter, order


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on negative numbers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (wrapping arithmetic), a bijective 64-bit mixer."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def epoch_key(seed: int, epoch: int) -> int:
    """The int64 key of one epoch's augmentation stream."""
    z = splitmix64(torch.tensor([seed], dtype=torch.int64))
    return int(splitmix64(z ^ epoch).item())


def sample_uniforms(key: int, index: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` uniforms in [0, 1) per sample, on ``index``'s device: a pure function of (key, index, draw)."""
    base = splitmix64(index.to(torch.int64) ^ key)
    draws = torch.arange(count, device=index.device, dtype=torch.int64) * _signed(_GOLDEN)
    bits = splitmix64(base[:, None] + draws[None, :])
    return _shr(bits, 40).to(torch.float32) * (1.0 / (1 << 24))  # 24 random bits: exact in float32


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma with torchvision's tensor coefficients (``rgb_to_grayscale``)."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


class BatchAugment:
    """timm's train augmentation family for a uint8 batch on the device; returns float images in [0, 1].

    Args:
        output_size: (H, W) of the augmented batch.
        scale, ratio: Random resized crop area fraction and aspect ratio range (timm's ``--scale``, ``--ratio``).
        hflip, vflip: Flip probabilities.
        color_jitter: Brightness, contrast and saturation factor (timm's ``--color-jitter``; 0 disables).
        interpolation: 'random' (bilinear or bicubic per sample), 'bilinear' or 'bicubic'.
        crop: False skips the random resized crop (timm's ``--no-aug`` keeps only the resize).
    """

    def __init__(
            self,
            output_size: Sequence[int],
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3. / 4., 4. / 3.),
            hflip: float = 0.5,
            vflip: float = 0.0,
            color_jitter: float = 0.0,
            interpolation: str = 'random',
            crop: bool = True,
    ):
        if interpolation not in SUPPORTED_INTERPOLATIONS:
            raise ValueError(f'interpolation {interpolation!r} is not one of {SUPPORTED_INTERPOLATIONS}')
        self.output_size = tuple(output_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip, self.vflip, self.color_jitter = hflip, vflip, color_jitter
        self.interpolation = interpolation
        self.crop = crop

    def crop_boxes(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(top, left, h, w) per sample from timm's RandomResizedCrop draw: the first of 10 tries that fits."""
        area = height * width
        target = (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0:10].double()) * area
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 10:20].double())
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        fits = (w <= width) & (h <= height)
        first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        top = torch.floor(u[:, 20].double() * (height - h + 1))
        left = torch.floor(u[:, 21].double() * (width - w + 1))
        # no try fits: timm's fallback, a centre crop clipped to the ratio range
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fw, fh = round(height * max(self.ratio)), height
        else:
            fw, fh = width, height
        # filled on the device (a small tensor from the host would be a blocking copy on every batch)
        fallback = torch.stack([torch.full_like(top, v) for v in ((height - fh) // 2, (width - fw) // 2, fh, fw)], 1)
        boxes = torch.stack([top, left, h, w], dim=1)
        return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, key: int) -> torch.Tensor:
        """Augment ``images`` (B x C x H x W uint8, 1 or 3 channels) of dataset rows ``index`` in stream ``key``."""
        batch, _, height, width = images.shape
        u = sample_uniforms(key, index, DRAWS)
        if self.crop:
            top, left, h, w = self.crop_boxes(u, height, width).unbind(1)
        else:  # timm's no-aug train transform: resize the shorter side, centre crop
            side = min(height, width)
            top = torch.full((batch,), float((height - side) // 2), dtype=torch.float64, device=u.device)
            left = torch.full_like(top, (width - side) // 2)
            h = w = torch.full_like(top, side)
        sx = torch.where(u[:, 22] < self.hflip, -1.0, 1.0).double()
        sy = torch.where(u[:, 23] < self.vflip, -1.0, 1.0).double()
        # output pixel centre u in [-1, 1] samples input x = u * w / W + (2 * left + w) / W - 1 (align_corners=False)
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=u.device)
        theta[:, 0, 0] = sx * w / width
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = sy * h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        x = images.float().div_(255)
        grid = F.affine_grid(theta.float(), [batch, x.shape[1], *self.output_size], align_corners=False)
        if self.interpolation == 'random':  # each half of the batch with its own mode (not both for everyone)
            bicubic = u[:, 24] >= 0.5
            out = torch.empty((batch, x.shape[1], *self.output_size), dtype=x.dtype, device=x.device)
            for mode, rows in (('bicubic', bicubic), ('bilinear', ~bicubic)):
                out[rows] = self._sample(x[rows], grid[rows], mode)
        else:
            out = self._sample(x, grid, self.interpolation)
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        if self.color_jitter > 0:
            out = self._jitter(out, u[:, 25:28], u[:, 28])
        return out

    def jitter(self, x: torch.Tensor, index: torch.Tensor, key: int) -> torch.Tensor:
        """Colour jitter alone, for float images in [0, 1] (B x 3 x H x W) of samples ``index`` in stream ``key``:
        the factors and order ``__call__`` draws for them (the per-sample paths' jitter on the device)."""
        u = sample_uniforms(key, index.to(x.device), DRAWS)
        return self._jitter(x, u[:, 25:28], u[:, 28])

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
        out = F.grid_sample(x, grid, mode=mode, padding_mode='border', align_corners=False)
        return out.clamp_(0, 1) if mode == 'bicubic' else out  # PIL clamps bicubic overshoot to the pixel range

    def _jitter(self, x: torch.Tensor, u: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation with per-sample factors, in one of the 6 orders per sample."""
        cj = self.color_jitter
        factors = (max(0.0, 1 - cj) + (1 + cj - max(0.0, 1 - cj)) * u)[:, :, None, None, None]  # B x 3 x 1 x 1 x 1
        # the op at each position for each of the 6 orders, as arithmetic on the order's index k in 0..5
        # (orders 012 021 102 120 201 210), so that nothing is copied from the host per batch
        k = (order * 6).long().clamp_(max=5)
        first = k // 2
        second = torch.where(k % 2 == 0, (first == 0).long(), 2 - (first == 2).long())
        perm = torch.stack([first, second, 3 - first - second], dim=1)  # B x 3
        # every op blends the image with a target, x * f + target * (1 - f): black for brightness, the mean grey
        # level for contrast, the grey image for saturation; one blend per position, each sample with its own op
        for position in range(3):
            op = perm[:, position].view(-1, 1, 1, 1)
            f = factors.view(-1, 3).gather(1, perm[:, position:position + 1]).view(-1, 1, 1, 1)
            grey = _grey(x)
            target = torch.where(op == 1, grey.mean(dim=(1, 2, 3), keepdim=True), grey) * (op != 0)
            x = (x * f + target * (1 - f)).clamp_(0, 1)
        return x


@dataclass(frozen=True)
class AugmentConfig:
    """timm's training augmentation flags (``train.py`` names), for both input paths.

    ``scale`` to ``no_aug`` decide what each sample looks like (the teacher cache keys on them, ``AUGMENT_FLAGS``);
    random erasing (``reprob``, ``remode``, ``recount``) runs on the device batch.
    """
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3. / 4., 4. / 3.)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    aa: Optional[str] = None
    train_interpolation: str = 'random'
    no_aug: bool = False
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1

    def applied_color_jitter(self) -> float:
        """The colour jitter timm's train transform applies: none with ``no_aug``, nor with an AutoAugment policy
        (timm turns it off there, except for its '3a' policies)."""
        if self.no_aug or (self.aa and '3a' not in self.aa):
            return 0.0
        return max(self.color_jitter, 0.0)

    def per_sample(self) -> dict:
        """The settings that decide what each sample looks like (``AUGMENT_FLAGS``), by name."""
        return {name: getattr(self, name) for name in AUGMENT_FLAGS}


AUGMENT_FLAGS = ('scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'aa', 'train_interpolation', 'no_aug')


def unsupported_reason(augment: AugmentConfig) -> Optional[str]:
    """Why timm's flags ask for augmentation this module does not do (the per-sample loader does), or None."""
    if augment.aa:
        return f'--aa {augment.aa} (AutoAugment/RandAugment run per sample on PIL images)'
    interpolation = 'bilinear' if augment.no_aug else augment.train_interpolation
    if interpolation not in SUPPORTED_INTERPOLATIONS:
        return f'--train-interpolation {interpolation}'
    return None
