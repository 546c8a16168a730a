"""The input pipeline: uint8 loader batches normalised on the device (the old numbers, exactly), and the in-memory
path's seeded batched augmentation."""

import numpy as np
import pytest
import torch
from timm.data import create_transform

from timm_icd.data.augment import AugmentConfig, BatchAugment, epoch_key, sample_uniforms, splitmix64
from timm_icd.data import ImageClassificationDataset, load_image_data
from timm_icd.data.pipeline import InputStage, create_pipeline

MASK64 = (1 << 64) - 1


def splitmix64_reference(z: int) -> int:
    """splitmix64 in Python's unbounded integers, reduced mod 2^64."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_matches_unsigned_reference():
    values = [0, 1, 7, 2 ** 40 + 3, 2 ** 63 - 1, -1, -(2 ** 63), -123456789]
    got = splitmix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & MASK64 for g in got] == [splitmix64_reference(v & MASK64) for v in values]


def test_uniforms_are_a_function_of_key_index_and_draw_only():
    key = epoch_key(3, 1)
    alone = sample_uniforms(key, torch.tensor([17]), 8)
    in_batch = sample_uniforms(key, torch.tensor([5, 17, 900]), 8)
    torch.testing.assert_close(in_batch[1], alone[0], rtol=0, atol=0)
    assert not torch.equal(sample_uniforms(epoch_key(3, 2), torch.tensor([17]), 8), alone)
    big = sample_uniforms(key, torch.arange(20000), 4)
    assert big.min() >= 0 and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.002


def _images(n=6, size=16, channels=3):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def test_identity_crop_and_flips_are_exact():
    images = _images()
    index = torch.arange(len(images))
    same = BatchAugment((16, 16), scale=(1, 1), ratio=(1, 1), hflip=0, interpolation='bilinear')
    torch.testing.assert_close(same(images, index, 1), images.float() / 255, rtol=0, atol=1e-6)
    flipped = BatchAugment((16, 16), scale=(1, 1), ratio=(1, 1), hflip=1, vflip=1, interpolation='bilinear')
    torch.testing.assert_close(flipped(images, index, 1), images.flip(2, 3).float() / 255, rtol=0, atol=1e-6)


def test_greyscale_images_come_out_as_three_equal_channels():
    out = BatchAugment((20, 20), color_jitter=0.4)(_images(channels=1), torch.arange(6), 5)
    assert out.shape == (6, 3, 20, 20)
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_crop_boxes_follow_timms_ranges():
    aug = BatchAugment((8, 8), scale=(0.2, 0.7), ratio=(0.5, 2.0))
    u = sample_uniforms(9, torch.arange(4000), 32)
    top, left, h, w = aug.crop_boxes(u, 40, 30).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    area = h * w / (40 * 30)
    assert area.min() > 0.17 and area.max() < 0.74  # rounding of h and w moves the area a little
    assert (w / h).min() > 0.45 and (w / h).max() < 2.2
    assert area.std() > 0.1  # not stuck on one box


def test_jitter_changes_colour_within_range_and_is_deterministic():
    aug = BatchAugment((16, 16), scale=(1, 1), ratio=(1, 1), hflip=0, color_jitter=0.4, interpolation='bilinear')
    images = _images()
    a, b = aug(images, torch.arange(6), 11), aug(images, torch.arange(6), 11)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - images.float() / 255).abs().amax(dim=(1, 2, 3)).min() > 0.01


def _pipeline(data, config, input_pipeline='loader', aa=None, color_jitter=0.4, jitter_on_device=True):
    augment = AugmentConfig(scale=(0.3, 1.0), ratio=(0.75, 1.333), hflip=0.5, vflip=0.0, color_jitter=color_jitter,
                            aa=aa, train_interpolation='random')
    return create_pipeline(data, config, augment, kind=input_pipeline, batch_size=4, workers=0, seed=5,
                           jitter_on_device=jitter_on_device)


@pytest.mark.parametrize('color_jitter, jitter_on_device', [(0.0, True), (0.4, False)])
def test_loader_path_gives_the_old_normalised_numbers_exactly(color_jitter, jitter_on_device):
    """uint8 from the workers + normalisation on the device == timm's float transform in the workers, where nothing
    moved to the device: no colour jitter, or the jitter kept in the workers."""
    data = load_image_data('digits')
    config = {'input_size': (3, 32, 32), 'mean': (0.5, 0.4, 0.3), 'std': (0.2, 0.25, 0.3), 'interpolation': 'bilinear',
              'crop_pct': 0.875, 'crop_mode': 'center'}
    pipeline = _pipeline(data, config, color_jitter=color_jitter, jitter_on_device=jitter_on_device)
    assert pipeline.train_stage.jitter is None
    old_tf = create_transform(**{**config, 'interpolation': 'random'}, is_training=True, scale=(0.3, 1.0),
                              ratio=(0.75, 1.333), hflip=0.5, color_jitter=color_jitter)
    old = ImageClassificationDataset(data.train, data.image_column, data.label_column, old_tf, seed=5)
    for epoch in (0, 3):
        pipeline.train_loader.dataset.set_epoch(epoch)
        old.set_epoch(epoch)
        rows = [0, 1, 250, 1000]
        batch = torch.utils.data.default_collate([pipeline.train_loader.dataset[i] for i in rows])
        x, y = pipeline.train_stage(batch, epoch)
        assert batch[0].dtype == torch.uint8
        assert torch.equal(x, torch.stack([old[i][0] for i in rows]))
        assert y.tolist() == [old[i][1] for i in rows]
    eval_old = create_transform(**config, is_training=False)
    x, _ = pipeline.eval_stage(torch.utils.data.default_collate([pipeline.eval_loader.dataset[i] for i in (0, 9)]))
    assert torch.equal(x, torch.stack([eval_old(data.eval[i]['image'].convert('RGB')) for i in (0, 9)]))


def test_worker_batches_read_rows_together_and_equal_row_by_row_samples():
    """A worker fetches a batch's rows in one Arrow query (``__getitems__``) and stacks the uint8 crops with numpy
    (``collate_images``): the batches equal row-by-row samples stacked by torch, bit for bit, contiguous, and the
    same for every worker count."""
    data = load_image_data('digits')
    config = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
              'crop_pct': 0.875, 'crop_mode': 'center'}
    augment = AugmentConfig(scale=(0.3, 1.0), ratio=(0.75, 1.333), hflip=0.5, color_jitter=0.4,
                            train_interpolation='random')
    batches = {}
    for workers in (0, 2):
        pipeline = create_pipeline(data, config, augment, kind='loader', batch_size=16, workers=workers, seed=3,
                                   with_index=True, jitter_on_device=False)
        pipeline.train_loader.dataset.set_epoch(2)
        batches[workers] = [batch for _, batch in zip(range(3), pipeline.train_loader)]
    dataset = pipeline.train_loader.dataset
    for (x0, y0, i0), (x2, y2, i2) in zip(batches[0], batches[2]):
        assert torch.equal(i0, i2) and torch.equal(y0, y2) and torch.equal(x0, x2)
        assert x2.dtype == torch.uint8 and x2.is_contiguous() and x2.shape == (16, 3, 32, 32)
        samples = [dataset[int(i)] for i in i2]
        assert torch.equal(x2, torch.stack([s[0] for s in samples]))
        assert y2.tolist() == [s[1] for s in samples] == [data.train[int(i)]['label'] for i in i2]
    assert [s[1] for s in dataset.__getitems__([5, 0, 5])] == [data.train[i]['label'] for i in (5, 0, 5)]


def test_loader_path_jitters_on_the_device_per_sample_with_timms_ranges():
    """Workers return the unjittered crops; the device applies brightness, contrast and saturation factors drawn in
    [1 - cj, 1 + cj] from (seed, epoch, row), in one of the six orders, as torchvision's ColorJitter does."""
    import itertools
    import torchvision.transforms.functional as TF
    data = load_image_data('digits')
    config = {'input_size': (3, 16, 16), 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'interpolation': 'bilinear',
              'crop_pct': 0.9, 'crop_mode': 'center'}
    jittered, plain = _pipeline(data, config, color_jitter=0.4), _pipeline(data, config, color_jitter=0.0)
    default = _pipeline(data, config, color_jitter=0.4, jitter_on_device=None)  # on the device on a GPU only
    assert default.views.get('color_jitter_on', 'workers') == ('device' if torch.cuda.is_available() else 'workers')
    assert jittered.views['color_jitter_on'] == 'device' and 'colour jitter on the device' in jittered.description
    rows = [3, 700, 12, 1200]
    batch = torch.utils.data.default_collate([jittered.train_loader.dataset[i] for i in rows])
    assert torch.equal(batch[0], torch.stack([plain.train_loader.dataset[i][0] for i in rows]))  # no jitter there
    assert batch[2].tolist() == rows
    x, _ = jittered.train_stage(batch, epoch=2)
    u = sample_uniforms(epoch_key(5, 2), torch.tensor(rows), 32)
    orders = list(itertools.permutations(range(3)))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for k, image in enumerate(batch[0].float() / 255):
        factors = 0.6 + 0.8 * u[k, 25:28]
        assert factors.min() >= 0.6 and factors.max() <= 1.4
        for op in orders[min(int(u[k, 28] * 6), 5)]:
            image = ops[op](image, factors[op].item())
        torch.testing.assert_close(x[k] * 0.25 + 0.5, image, rtol=0, atol=1e-5)
    again, _ = jittered.train_stage((batch[0][1:], batch[1][1:], batch[2][1:]), epoch=2)
    torch.testing.assert_close(again, x[1:], rtol=0, atol=0)  # a sample's jitter does not depend on its batch
    other, _ = jittered.train_stage(batch, epoch=3)
    assert not torch.allclose(other, x)


def test_memory_path_eval_equals_the_loader_path_and_train_is_seeded_per_sample():
    data = load_image_data('digits')
    config = {'input_size': (3, 32, 32), 'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25),
              'interpolation': 'bilinear', 'crop_pct': 0.9, 'crop_mode': 'center'}
    memory = _pipeline(data, config, input_pipeline='auto')
    loader = _pipeline(data, config, input_pipeline='loader')
    assert memory.kind == 'memory' and loader.kind == 'loader'
    assert memory.train_stage.images.shape == (len(data.train), 1, 8, 8)  # digits: 8x8 greyscale, stored once
    rows = [3, 4, 359]
    x_mem, y_mem = memory.eval_stage((torch.tensor(rows), torch.tensor([0, 0, 0])))
    x_old, _ = loader.eval_stage(torch.utils.data.default_collate([loader.eval_loader.dataset[i] for i in rows]))
    assert torch.equal(x_mem, x_old)

    stage = memory.train_stage
    a, _ = stage((torch.tensor([7, 8, 9]), None), epoch=2)
    b, _ = stage((torch.tensor([100, 8]), None), epoch=2)
    c, _ = stage((torch.tensor([8]), None), epoch=3)
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a[1], b[1])  # a sample's augmentation does not depend on its batch
    assert not torch.equal(a[1], c[0])  # but changes with the epoch
    # normalised with the given mean and std: back in [0, 1] after undoing it
    raw = a * 0.25 + 0.5
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6


def test_random_erasing_runs_on_the_device_batch_seeded_by_its_place():
    stage = InputStage((0.5,) * 3, (0.5,) * 3, erasing=None)
    from timm.data.random_erasing import RandomErasing
    erasing_stage = InputStage((0.5,) * 3, (0.5,) * 3, erasing=RandomErasing(1.0, device='cpu'), seed=1)
    batch = (torch.full((4, 3, 16, 16), 128, dtype=torch.uint8), None)
    plain, _ = stage(batch)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    e1, _ = erasing_stage(batch, epoch=1, step=2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout's) is left as it was
    e2, _ = erasing_stage(batch, epoch=1, step=2)
    e3, _ = erasing_stage(batch, epoch=1, step=3)
    assert torch.equal(e1, e2) and not torch.equal(e1, e3)
    erased = (e1 != plain).flatten(1).any(1)
    assert erased.all()


def test_auto_falls_back_to_the_loader_for_per_sample_policies():
    data = load_image_data('digits')
    config = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
              'crop_pct': 0.9, 'crop_mode': 'center'}
    assert _pipeline(data, config, input_pipeline='auto', aa='rand-m9-mstd0.5').kind == 'loader'
    from timm_icd.base import UserError
    with pytest.raises(UserError, match='--input-pipeline memory cannot apply --aa'):
        _pipeline(data, config, input_pipeline='memory', aa='rand-m9-mstd0.5')


def test_images_of_different_sizes_use_the_loader(tmp_path):
    from PIL import Image
    for label in ('a', 'b'):
        (tmp_path / label).mkdir()
        for i in range(6):
            size = 20 + 4 * i
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(tmp_path / label / f'{i}.png')
    data = load_image_data(f'imagefolder:{tmp_path}')
    config = {'input_size': (3, 16, 16), 'mean': (0.5,) * 3, 'std': (0.5,) * 3, 'interpolation': 'bilinear',
              'crop_pct': 0.9, 'crop_mode': 'center'}
    assert _pipeline(data, config, input_pipeline='auto').kind == 'loader'


@pytest.mark.parametrize('order_index', range(6))
def test_jitter_equals_torchvisions_colour_ops_in_each_order(order_index):
    import itertools
    import torchvision.transforms.functional as TF
    torch.manual_seed(order_index)
    x = torch.rand(3, 3, 12, 12)
    u = torch.tensor([[0.1, 0.5, 0.9], [0.7, 0.2, 0.4], [0.3, 0.95, 0.05]])
    order = torch.full((3,), (order_index + 0.5) / 6)
    got = BatchAugment((12, 12), color_jitter=0.4)._jitter(x, u, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    perm = list(itertools.permutations(range(3)))[order_index]
    for i in range(3):
        want = x[i]
        factors = 0.6 + 0.8 * u[i]
        for op in perm:
            want = ops[op](want, factors[op].item())
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)
