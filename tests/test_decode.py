"""Reduced JPEG decoding and decoding on the device: the DCT scale never leaves fewer pixels than the output, the
random draws are timm's, the crops stay close to full decoding, and images reach the crop undecoded on every path."""
import io
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from timm_icd.data import AugmentConfig, create_pipeline, decode_factor, load_stream_data, write_shards
from timm_icd.data.decode import (
    DeviceJpeg, ReducedDecodeCrop, create_train_transform, decode_on_device, open_image, reducible, stack_images)
from timm_icd.data.sources import ImageClassificationDataset, load_image_data
from timm_icd.data.streaming import _decode_batch

REDUCED_PSNR = 30.0  # dB, every crop: reduced against full decoding (observed: median 42-51, lowest 34)
DEVICE_PSNR = 40.0  # dB, every crop: torchvision's decoder and resize against PIL's (observed: lowest 55)
CONFIG = {'input_size': (3, 64, 64), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
          'crop_pct': 0.9, 'crop_mode': 'center'}


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float('inf') if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.fixture(scope='module')
def photos():
    """scikit-learn's two bundled photographs (640x427 RGB)."""
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(image) for image in load_sample_images().images]


def encoded(image: Image.Image, size, fmt='JPEG', mode='RGB') -> bytes:
    buffer = io.BytesIO()
    image.convert(mode).resize(size, Image.BICUBIC).save(buffer, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def test_decode_factor_never_leaves_fewer_pixels_than_the_output_and_is_the_coarsest():
    rng = np.random.default_rng(0)
    applied = 0
    for crop_w, crop_h, out_w, out_h in zip(*rng.integers(1, 4000, (2, 20000)), *rng.integers(1, 400, (2, 20000))):
        k = decode_factor(int(crop_w), int(crop_h), int(out_w), int(out_h))
        assert k in (1, 2, 4, 8)
        assert crop_w / k >= out_w and crop_h / k >= out_h or k == 1
        assert k == 8 or not (crop_w >= 2 * k * out_w and crop_h >= 2 * k * out_h)  # the coarsest that fits
        applied += k > 1
    assert 1000 < applied < 19000  # both outcomes occur
    assert [decode_factor(*c, 224, 224) for c in ((448, 448), (447, 900), (900, 447), (1792, 1792), (1791, 1792),
                                                  (500, 375))] == [2, 1, 1, 8, 4, 1]
    assert decode_factor(1000, 1000, 100, 300) == 2  # the tighter direction decides


def test_the_drafted_scale_is_the_chosen_factor_even_for_odd_sizes(photos):
    for size in ((1001, 757), (999, 1333), (640, 427)):
        for k in (2, 4, 8):
            image = Image.open(io.BytesIO(encoded(photos[0], size)))
            _, box = image.draft('RGB', (size[0] // k, size[1] // k))
            assert box[2] == pytest.approx(size[0] / k) and image.size == (-(-size[0] // k), -(-size[1] // k))


def test_reduced_crops_draw_timms_numbers_and_stay_close_to_full_decoding(photos):
    timm_crop = RandomResizedCropAndInterpolation(64, interpolation='random')
    ours = ReducedDecodeCrop.from_timm(timm_crop)
    factors = []
    for seed in range(40):
        data = encoded(photos[seed % 2], ((1001, 757), (640, 427), (300, 200))[seed % 3])
        random.seed(seed)
        want = timm_crop(Image.open(io.BytesIO(data)))
        state = random.getstate()
        random.seed(seed)
        image = Image.open(io.BytesIO(data))
        assert reducible(image)
        i, j, h, w, _ = ours.draw(image)
        factors.append(ours.factor(image, h, w))
        random.seed(seed)
        got = ours(image)
        assert random.getstate() == state and got.size == want.size == (64, 64) and got.mode == 'RGB'
        if factors[-1] == 1:
            assert np.array_equal(np.asarray(got), np.asarray(want))
        else:
            assert psnr(got, want) > REDUCED_PSNR, (seed, factors[-1])
    assert {1, 2, 4} <= set(factors)


@pytest.mark.parametrize('kind', ['png', 'grey jpeg', 'decoded jpeg'])
def test_other_images_are_cropped_exactly_as_timm_does(photos, kind):
    fmt, mode = {'png': ('PNG', 'RGB'), 'grey jpeg': ('JPEG', 'L'), 'decoded jpeg': ('JPEG', 'RGB')}[kind]
    data = encoded(photos[1], (1000, 700), fmt, mode)
    timm_crop = RandomResizedCropAndInterpolation(64, interpolation='random')
    for seed in range(5):
        images = [Image.open(io.BytesIO(data)) for _ in range(2)]
        if kind == 'decoded jpeg':
            images[1].load()
        assert not reducible(images[1])
        random.seed(seed)
        want = timm_crop(images[0])
        random.seed(seed)
        assert np.array_equal(np.asarray(ReducedDecodeCrop.from_timm(timm_crop)(images[1])), np.asarray(want))


def _recorder(seen: list):
    def transform(image):
        seen.append(reducible(image))
        return torch.zeros(3, 4, 4, dtype=torch.uint8)
    return transform


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory, photos):
    """An imagefolder of JPEGs of several sizes in two classes, and one PNG and one greyscale JPEG among them."""
    root = tmp_path_factory.mktemp('jpegs')
    sizes = ((640, 427), (427, 640), (500, 375), (1001, 757), (300, 200), (200, 300))
    for i, size in enumerate(sizes * 2):
        folder = root / 'train' / f'class_{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        name, fmt, mode = (f'{i}.png', 'PNG', 'RGB') if i == 4 else (f'{i}.jpg', 'JPEG', 'L' if i == 7 else 'RGB')
        (folder / name).write_bytes(encoded(photos[i % 2], size, fmt, mode))
    return root


def test_images_reach_the_transform_undecoded_on_the_loader_and_stream_paths(jpeg_folder):
    data = load_image_data(f'imagefolder:{jpeg_folder}', val_fraction=0.25)
    seen = []
    rows = ImageClassificationDataset(data.train, data.image_column, data.label_column, _recorder(seen))
    for index in range(len(rows)):
        rows[index]
    raw = data.train.cast_column(data.image_column, datasets.Image(decode=False))
    kinds = [open_image(raw[i][data.image_column]) for i in range(len(raw))]
    want = [image.format == 'JPEG' and image.mode == 'RGB' for image in kinds]
    assert seen == want and 0 < sum(want) < len(want)  # undecoded RGB JPEGs; the PNG and the grey JPEG are not
    seen.clear()
    stream_rows = [{'jpg': raw[i][data.image_column], 'cls': 0} for i in range(len(raw))]
    _decode_batch(stream_rows, list(range(len(raw))), _recorder(seen), 'jpg', 'cls', 2, 'train')
    assert seen == want


def _stream_rows(jpeg_folder):
    paths = sorted(jpeg_folder.rglob('*.*'))
    return [{'jpg': {'bytes': p.read_bytes(), 'path': None}, 'cls': i % 2, '__key__': p.stem, '__url__': 'a.tar'}
            for i, p in enumerate(paths)]


@pytest.mark.parametrize('decode_scale', ['off', 'auto'])
def test_device_decoding_on_cpu_gives_the_cpu_paths_crops(jpeg_folder, decode_scale):
    augment = AugmentConfig(scale=(0.08, 1.0), hflip=0.5, vflip=0.5, train_interpolation='random')
    transform = create_train_transform(CONFIG, augment, decode_scale)
    rows, seeds = _stream_rows(jpeg_folder), [1000 + i for i in range(12)]
    cpu, labels, ids, _ = _decode_batch(rows, seeds, transform, 'jpg', 'cls', 2, 'train')
    items, labels_d, ids_d, _ = _decode_batch(rows, seeds, transform, 'jpg', 'cls', 2, 'train', device_decode=True)
    assert torch.equal(labels, labels_d) and torch.equal(ids, ids_d) and ids.tolist() == seeds
    on_device = [isinstance(item, DeviceJpeg) for item in items]
    assert sum(on_device) == 10  # the PNG and the greyscale JPEG go through the CPU path, in their places
    for item, want in zip(items, cpu):
        if not isinstance(item, DeviceJpeg):
            assert torch.equal(item, want)
    batch, kept, skipped = decode_on_device(items, (64, 64), torch.device('cpu'))
    assert batch.shape == cpu.shape == (12, 3, 64, 64) and batch.dtype == torch.uint8
    assert kept == list(range(12)) and skipped == []
    bound = DEVICE_PSNR if decode_scale == 'off' else REDUCED_PSNR
    for got, want in zip(batch, cpu):
        assert psnr(got, want) > bound
    # the draws decide: another seed gives other crops
    other, *_ = _decode_batch(rows, [s + 1 for s in seeds], transform, 'jpg', 'cls', 2, 'train')
    assert min(psnr(a, b) for a, b in zip(other, cpu)) < 20


def test_a_damaged_jpeg_on_the_device_is_named_or_skipped(jpeg_folder):
    transform = create_train_transform(CONFIG, AugmentConfig(), 'off')
    rows = _stream_rows(jpeg_folder)[:3]
    rows[1]['jpg'] = {'bytes': rows[1]['jpg']['bytes'][:2000], 'path': None}  # the header reads, the scan does not
    items, *_ = _decode_batch(rows, [1, 2, 3], transform, 'jpg', 'cls', 2, 'train', device_decode=True)
    where = f"shard a.tar, sample {rows[1]['__key__']}"
    with pytest.raises(ValueError, match=f'cannot decode the JPEG \\({where}\\) on cpu'):
        decode_on_device(items, (64, 64), torch.device('cpu'))
    batch, kept, skipped = decode_on_device(items, (64, 64), torch.device('cpu'), skip_bad=True)
    assert batch.shape[0] == 2 and kept == [0, 2] and skipped == [where]


def test_stream_pipeline_decodes_on_the_device_and_jitters_there(jpeg_folder, tmp_path):
    write_shards(f'imagefolder:{jpeg_folder}', str(tmp_path / 'pq'), shard_size=4, fmt='parquet')  # formats kept
    data = load_stream_data(f'parquet:{tmp_path / "pq"}', val_split='train')
    pipelines = [create_pipeline(data, CONFIG, AugmentConfig(color_jitter=jitter), batch_size=6, workers=0, seed=3,
                                 decode_device=device, shuffle_buffer=8, jitter_on_device=True)
                 for device, jitter in ((None, 0.4), ('cpu', 0.4), ('cpu', 0.0))]
    assert 'decode: RGB JPEGs in batches on cpu' in pipelines[1].description
    assert 'colour jitter on the device' in pipelines[1].description
    assert pipelines[1].views == {'decode_scale': 'auto', 'color_jitter_on': 'device', 'decode_device': 'cpu'}
    (x, y, ids), (x_d, y_d, ids_d) = [next(iter(p.train_loader)) for p in pipelines[:2]]
    x_plain, y_plain = next(iter(pipelines[2].train_loader))  # no jitter: no ids
    assert torch.equal(y, y_d) and torch.equal(ids, ids_d) and x_d.dtype == torch.uint8 and x_d.shape == x.shape
    assert all(psnr(a, b) > REDUCED_PSNR for a, b in zip(x, x_d))
    assert torch.equal(x_d, x_plain)  # the jitter is no part of the workers' draws
    jittered, _ = pipelines[1].train_stage((x_d, y_d, ids_d), epoch=0)
    plain, _ = pipelines[2].train_stage((x_plain, y_plain), epoch=0)
    assert jittered.shape == (6, 3, 64, 64) and (jittered - plain).abs().flatten(1).amax(1).min() > 0.01


def test_decode_flags_are_checked_up_front_and_named_in_the_log(monkeypatch):
    from timm_icd.base import UserError
    from timm_icd.run import parse_and_validate
    assert (parse_and_validate([]).decode_scale, parse_and_validate([]).decode_device) == ('auto', 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match='--decode-device cuda decodes JPEGs on the GPU and needs one'):
            parse_and_validate(['--decode-device', 'cuda', '--streaming'])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    with pytest.raises(UserError, match='--decode-device cuda decodes streamed batches: add --streaming'):
        parse_and_validate(['--decode-device', 'cuda'])
    with pytest.raises(UserError, match='cannot apply --aa rand-m9-mstd0.5'):
        parse_and_validate(['--decode-device', 'cuda', '--streaming', '--aa', 'rand-m9-mstd0.5'])
    with pytest.raises(UserError, match='cannot apply --train-interpolation lanczos'):
        parse_and_validate(['--decode-device', 'cuda', '--streaming', '--train-interpolation', 'lanczos'])
    assert parse_and_validate(['--decode-device', 'cuda', '--streaming']).decode_device == 'cuda'
    data = load_image_data('digits')
    words = {scale: create_pipeline(data, CONFIG, kind='loader', batch_size=4, decode_scale=scale).description
             for scale in ('auto', 'off')}
    assert 'decode: JPEGs at 1/2, 1/4 or 1/8 scale where the crop is shrunk 2x or more' in words['auto']
    assert 'decode: in full' in words['off']
    with pytest.raises(UserError, match='--decode-device cpu decodes streamed batches'):
        create_pipeline(data, CONFIG, kind='loader', batch_size=4, decode_device='cpu')


def test_stack_images_copies_strided_uint8_views_into_one_contiguous_batch():
    """timm's transforms end in C x H x W views of H x W x C pixels; the batch is their exact, contiguous stack
    (from tensors or arrays), and anything that is not uint8 of one shape goes to torch.stack."""
    rng = np.random.default_rng(0)
    views = [torch.from_numpy(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(4)]
    for images in (views, [v.numpy() for v in views]):
        batch = stack_images(images)
        assert batch.dtype == torch.uint8 and batch.is_contiguous() and batch.shape == (4, 3, 7, 5)
        assert torch.equal(batch, torch.stack([torch.as_tensor(v) for v in images]))
    floats = [v.float() / 255 for v in views]
    assert torch.equal(stack_images(floats), torch.stack(floats))
