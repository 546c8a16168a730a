"""Data through datasets: every --dataset source, column detection, splits, label checks, seeded augmentation."""
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from timm_icd import UserError
from timm_icd.data import ImageClassificationDataset, digits_dataset, find_bad_images, load_image_data


def test_digits_is_the_real_sklearn_data_in_a_stratified_split():
    from sklearn.datasets import load_digits
    dd = digits_dataset()
    assert (len(dd['train']), len(dd['test'])) == (1437, 360)
    row = dd['train'][0]
    assert row['image'].size == (8, 8) and row['image'].mode == 'L'
    assert dd['train'].features['label'].num_classes == 10
    counts = np.bincount(dd['test']['label'])
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    # every image is one of sklearn's, scaled from 0..16 to 0..255
    raw = load_digits()
    scaled = {((img * 255 / 16).round().astype(np.uint8)).tobytes() for img in raw.images}
    assert all(np.asarray(dd['test'][i]['image']).tobytes() in scaled for i in range(20))
    data = load_image_data('digits')
    assert (data.image_column, data.label_column, data.num_classes, data.eval_split) == ('image', 'label', 10, 'test')
    assert data.label_names == [str(i) for i in range(10)]


def _write_imagefolder(root, per_class=6, split_counts=(('train', 6), ('test', 2))):
    dd = digits_dataset()['train']
    for split, n in split_counts:
        for label in range(3):
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True)
            rows = [r for r in dd.select(range(200)) if r['label'] == label][:n]
            for i, r in enumerate(rows):
                r['image'].resize((20, 20)).save(folder / f'{i}.png')


def test_imagefolder_of_real_png_files(tmp_path):
    _write_imagefolder(tmp_path / 'imgs')
    data = load_image_data(f'imagefolder:{tmp_path / "imgs"}')
    assert (len(data.train), len(data.eval), data.num_classes) == (18, 6, 3)
    assert data.label_names == ['class_0', 'class_1', 'class_2']
    assert data.eval_split == 'test'
    ds = ImageClassificationDataset(data.train, data.image_column, data.label_column, transform=lambda im: im)
    image, label = ds[0]
    assert image.mode == 'RGB' and image.size == (20, 20) and 0 <= label < 3


def test_save_to_disk_folder_with_cifar_style_columns_and_overrides(tmp_path):
    images = [Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)) for i in range(12)]
    features = datasets.Features({'coarse_label': datasets.Value('int64'), 'img': datasets.Image(),
                                  'fine_label': datasets.ClassLabel(names=['a', 'b', 'c'])})
    ds = datasets.Dataset.from_dict({'coarse_label': [0] * 12, 'img': images, 'fine_label': [i % 3 for i in range(12)]},
                                    features=features)
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(tmp_path / 'cifarish')
    data = load_image_data(str(tmp_path / 'cifarish'))
    assert (data.image_column, data.label_column, data.label_names) == ('img', 'fine_label', ['a', 'b', 'c'])
    assert data.train.column_names == ['img', 'fine_label']
    data = load_image_data(str(tmp_path / 'cifarish'), label_column='coarse_label')
    assert data.num_classes == 1
    with pytest.raises(UserError, match="no label column 'nope'.*coarse_label, img, fine_label"):
        load_image_data(str(tmp_path / 'cifarish'), label_column='nope')
    with pytest.raises(UserError, match="no split 'validation'.*train, test"):
        load_image_data(str(tmp_path / 'cifarish'), val_split='validation')


def test_missing_eval_split_holds_out_part_of_train_and_bad_labels_are_caught(tmp_path):
    images = [Image.new('L', (5, 5), i) for i in range(40)]
    ds = datasets.Dataset.from_dict({'picture': images, 'target': [i % 4 for i in range(40)]},
                                    features=datasets.Features({'picture': datasets.Image(),
                                                                'target': datasets.Value('int32')}))
    ds.save_to_disk(tmp_path / 'plain')
    data = load_image_data(str(tmp_path / 'plain'), val_fraction=0.25)
    assert (len(data.train), len(data.eval), data.num_classes) == (30, 10, 4)
    assert data.eval_split == 'train[holdout 0.25]'
    bad = ds.map(lambda r, i: {'target': -1 if i == 7 else r['target']}, with_indices=True)
    datasets.DatasetDict(train=bad, test=ds).save_to_disk(tmp_path / 'badlabels')
    with pytest.raises(UserError, match=r"row 7 has label -1, outside 0..3"):
        load_image_data(str(tmp_path / 'badlabels'))
    with pytest.raises(UserError, match="split 'test'.* is empty"):
        load_image_data(datasets.DatasetDict(train=ds, test=ds.select([])))


def test_missing_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match='dataset folder not found'):
        load_image_data(f'imagefolder:{tmp_path / "none"}')
    with pytest.raises(UserError, match='dataset folder not found'):
        load_image_data(str(tmp_path / 'a' / 'b'))
    (tmp_path / 'notadataset').mkdir()
    with pytest.raises(UserError, match='not a datasets save_to_disk folder.*imagefolder:'):
        load_image_data(str(tmp_path / 'notadataset'))


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index():
    from timm.data import create_transform
    dd = digits_dataset()
    tf = create_transform(16, is_training=True, scale=(0.3, 1.0), hflip=0.5, color_jitter=0.4)
    a = ImageClassificationDataset(dd['train'], 'image', 'label', tf, seed=7)
    b = ImageClassificationDataset(dd['train'], 'image', 'label', tf, seed=7)
    for i in (5, 3, 1):  # a different order of access
        b[i]
    torch.manual_seed(123)
    random.seed(123)
    global_state = torch.get_rng_state(), random.getstate()
    x1, y1 = a[3]
    assert torch.equal(torch.get_rng_state(), global_state[0]) and random.getstate() == global_state[1]
    x2, _ = b[3]
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    assert x1.shape == (3, 16, 16) and y1 == dd['train'][3]['label']
    a.set_epoch(1)
    assert not torch.equal(a[3][0], x1)


def test_unreadable_image_is_named_or_skipped(tmp_path):
    _write_imagefolder(tmp_path / 'imgs', split_counts=(('train', 4),))
    victim = sorted((tmp_path / 'imgs' / 'train' / 'class_1').glob('*.png'))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    data = load_image_data(f'imagefolder:{tmp_path / "imgs"}', val_fraction=0.25)
    everything = datasets.concatenate_datasets([data.train, data.eval])
    bad = find_bad_images(everything, data.image_column)
    assert len(bad) == 1
    ds = ImageClassificationDataset(everything, data.image_column, data.label_column, lambda im: im)
    with pytest.raises(UserError, match=rf"row {bad[0]} \(file .*{victim.name}\) of split 'train'.*--skip-bad"):
        ds[bad[0]]
