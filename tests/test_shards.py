"""``python -m timm_icd shards``: real images written as webdataset/parquet shards and read back with ``datasets``."""
import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from timm_icd.cli.shards import main as shards_main
from timm_icd.data import shards
from timm_icd.data import load_dataset_dict

BUILDER_COLUMNS = {'webdataset': ('png', 'cls'), 'parquet': ('image', 'label')}


def _files(out: Path) -> list:
    return sorted(p.name for p in out.iterdir())


def _load(builder: str, out: Path, tmp_path: Path, **kwargs):
    return datasets.load_dataset(builder, data_dir=str(out), cache_dir=str(tmp_path / 'cache'), **kwargs)


def _pixels_equal(got, want) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder with train/ and test/ splits of two classes: JPEG files, plus PNG ones in train/cat."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.RandomState(0)
    for split, per_class in (('train', 5), ('test', 2)):
        for cls in ('cat', 'dog'):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                image = Image.fromarray(rng.randint(0, 256, (12, 10, 3), dtype=np.uint8))
                image.save(root / split / cls / f'{i}.jpg', quality=75)
    return root


@pytest.mark.parametrize('fmt', ['webdataset', 'parquet'])
def test_digits_shards_read_back(fmt, digits_small, tmp_path):
    out = tmp_path / 'shards'
    result = run_cli(digits_small, out, '--shard-size', 100, '--format', fmt, command='shards')
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Split 'train': 256 rows in 3" in result.stderr and "Split 'test': 72 rows in 1" in result.stderr
    suffix = shards.SUFFIX[fmt]
    assert _files(out) == ['README.md', f'test-00000-of-00001.{suffix}', shards.META_FILE,
                           *[f'train-0000{i}-of-00003.{suffix}' for i in range(3)]]
    meta = json.loads((out / shards.META_FILE).read_text())
    image_column, label_column = BUILDER_COLUMNS[fmt]
    assert meta['label_names'] == [str(i) for i in range(10)] and meta['num_classes'] == 10
    assert (meta['image_column'], meta['label_column']) == (image_column, label_column)
    assert meta['splits']['train']['shard_rows'] == [86, 85, 85] and meta['splits']['test']['rows'] == 72

    source = datasets.load_from_disk(digits_small)
    loaded = _load(fmt, out, tmp_path)
    assert list(loaded) == ['train', 'test']
    for split in loaded:
        assert len(loaded[split]) == len(source[split])
        assert list(loaded[split][label_column]) == list(source[split]['label'])
        assert _pixels_equal(loaded[split][image_column], source[split]['image'])
    features = loaded['train'].features
    assert isinstance(features[image_column], datasets.Image)
    if fmt == 'webdataset':  # the builder types cls as int64 and adds the sample key and shard
        assert features['cls'] == datasets.Value('int64')
        assert loaded['train']['__key__'][:2] == ['train_00000000', 'train_00000001']
        assert len(set(loaded['train']['__key__'])) == 256
    else:  # parquet keeps datasets' features, class names included
        assert features['label'].names == [str(i) for i in range(10)]
    # README.md declares the features: loading the folder itself gives a ClassLabel with names for both formats
    by_folder = datasets.load_dataset(str(out), cache_dir=str(tmp_path / 'cache'))
    assert by_folder['test'].features[label_column].names == meta['label_names']
    streamed = _load(fmt, out, tmp_path, streaming=True)
    assert sum(1 for _ in streamed['train']) == 256 and streamed['train'].num_shards == 3


@pytest.mark.parametrize('fmt', ['webdataset', 'parquet'])
def test_imagefolder_jpeg_bytes_kept(fmt, image_folder, tmp_path):
    out = tmp_path / 'shards'
    assert shards_main([f'imagefolder:{image_folder}', str(out), '--shard-size', '4', '--format', fmt]) == 0
    source = load_dataset_dict(f'imagefolder:{image_folder}')
    assert _files(out)[1:] == [f'test-00000-of-00001.{shards.SUFFIX[fmt]}', shards.META_FILE,
                               *[f'train-0000{i}-of-00003.{shards.SUFFIX[fmt]}' for i in range(3)]]
    files = [source['train'].cast_column('image', datasets.Image(decode=False))[i]['image']['path'] for i in range(10)]
    if fmt == 'webdataset':
        with tarfile.open(out / 'train-00000-of-00003.tar') as tar:
            members = tar.getnames()[:4]
            first = tar.extractfile('train_00000000.jpg').read()
        assert members == ['train_00000000.jpg', 'train_00000000.cls', 'train_00000001.jpg', 'train_00000001.cls']
    else:
        first = _load('parquet', out, tmp_path)['train'].cast_column('image', datasets.Image(decode=False))[0]['image']
        first = first['bytes']
    assert first == Path(files[0]).read_bytes()  # the JPEG is kept, not re-encoded
    image_column, label_column = ('jpg', 'cls') if fmt == 'webdataset' else BUILDER_COLUMNS[fmt]
    loaded = _load(fmt, out, tmp_path)
    for split in ('train', 'test'):
        assert list(loaded[split][label_column]) == list(source[split]['label'])
        assert _pixels_equal(loaded[split][image_column], source[split]['image'])
    assert json.loads((out / shards.META_FILE).read_text())['label_names'] == ['cat', 'dog']


def test_mixed_formats_become_lossless_png(image_folder, tmp_path):
    mixed = tmp_path / 'mixed'
    for path in image_folder.rglob('*.jpg'):  # the same JPEGs, and the cats of train as PNG
        target = mixed / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.parts[-3:-1] == ('train', 'cat'):
            Image.open(path).save(target.with_suffix('.png'))
        else:
            target.write_bytes(path.read_bytes())
    out = tmp_path / 'shards'
    assert shards_main([f'imagefolder:{mixed}', str(out), '--shard-size', '100', '--splits', 'train']) == 0
    assert _files(out) == ['README.md', 'timm_icd_shards.json', 'train-00000-of-00001.tar']
    source = load_dataset_dict(f'imagefolder:{mixed}')['train']
    loaded = _load('webdataset', out, tmp_path)['train']
    assert list(loaded.features)[:2] == ['png', 'cls'] and list(loaded['cls']) == list(source['label'])
    assert _pixels_equal(loaded['png'], source['image'])


def test_refuses_existing_shards_and_bad_shard_size(digits_small, tmp_path):
    out = tmp_path / 'shards'
    assert shards_main([digits_small, str(out), '--shard-size', '1000', '--splits', 'test']) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_cli(digits_small, out, '--shard-size', 10, command='shards')
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1 and result.stderr.startswith('error: ')
    assert 'not an empty folder' in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert shards_main([digits_small, str(tmp_path / 'other'), '--shard-size', '0']) == 2
    assert not (tmp_path / 'other').exists()
    assert shards_main([digits_small, str(tmp_path / 'other'), '--shard-size', '5', '--splits', 'extra']) == 2


def test_unreadable_image_leaves_no_partial_shard(image_folder, tmp_path, capsys):
    broken = tmp_path / 'broken'
    for path in (image_folder / 'train').rglob('*.jpg'):
        target = broken / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (broken / 'train' / 'dog' / '4.jpg').write_bytes(b'not a jpeg')  # the last row
    out = tmp_path / 'shards'
    assert shards_main([f'imagefolder:{broken}', str(out), '--shard-size', '4', '--format', 'parquet']) == 2
    assert "cannot read the image in row 9 of split 'train'" in capsys.readouterr().err
    # complete shards stay, the one that failed is not there under any name, and no metadata marks the run complete
    assert sorted(p.name for p in out.iterdir()) == ['train-00000-of-00003.parquet', 'train-00001-of-00003.parquet']


@pytest.mark.parametrize('fmt', ['webdataset', 'parquet'])
def test_decoded_pixels_are_written_as_png(fmt, tmp_path):
    rng = np.random.RandomState(1)
    pixels = rng.randint(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    features = datasets.Features({'img': datasets.Array3D((6, 5, 3), 'uint8'), 'target': datasets.Value('int32')})
    source = datasets.Dataset.from_dict({'img': pixels, 'target': [0, 3, 1, 2, 3, 0, 1]}, features=features)
    datasets.DatasetDict(train=source).save_to_disk(tmp_path / 'src')
    out = tmp_path / 'shards'
    assert shards_main([str(tmp_path / 'src'), str(out), '--shard-size', '3', '--format', fmt]) == 0
    meta = json.loads((out / shards.META_FILE).read_text())
    assert meta['label_names'] is None and meta['num_classes'] == 4
    assert meta['splits']['train']['shard_rows'] == [3, 2, 2]
    image_column, label_column = BUILDER_COLUMNS[fmt]
    loaded = _load(fmt, out, tmp_path)['train']
    assert loaded.features[label_column] == datasets.Value('int64')
    assert list(loaded[label_column]) == [0, 3, 1, 2, 3, 0, 1] and _pixels_equal(loaded[image_column], pixels)


@pytest.mark.parametrize('fmt', ['webdataset', 'parquet'])
def test_max_size_bounds_large_images_and_keeps_small_ones_bytes(fmt, tmp_path, caplog):
    """Above --max-size: resized (longer side S), JPEG at --quality or PNG as lossless PNG; at or below: the bytes."""
    rng = np.random.RandomState(2)
    root, sizes = tmp_path / 'src', {'0.jpg': (150, 100), '1.jpg': (64, 40), '2.jpg': (60, 90), '3.jpg': (30, 200)}
    if fmt == 'parquet':  # parquet keeps every format as stored: PNGs too
        sizes.update({'4.png': (100, 80), '5.png': (20, 20)})
    for i, (name, (w, h)) in enumerate(sizes.items()):
        (root / 'train' / 'ab'[i % 2]).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(root / 'train' / 'ab'[i % 2] / name, **({'quality': 95} if name.endswith('jpg') else {}))
    out = tmp_path / 'shards'
    caplog.set_level('INFO')
    assert shards_main([f'imagefolder:{root}', str(out), '--shard-size', '2', '--format', fmt, '--max-size', '64',
                        '--quality', '70']) == 0
    resized = sum(max(size) > 64 for size in sizes.values())
    assert resized == (4 if fmt == 'parquet' else 3) and f'{resized} images above 64 px resized' in caplog.text
    meta = json.loads((out / shards.META_FILE).read_text())
    assert (meta['max_size'], meta['quality'], meta['splits']['train']['resized']) == (64, 70, resized)
    split = meta['splits']['train']
    assert split['shard_bytes'] == [(out / f).stat().st_size for f in split['files']]
    source = datasets.load_dataset('imagefolder', data_dir=str(root), split='train')
    originals = source.cast_column('image', datasets.Image(decode=False))['image']
    column = 'jpg' if fmt == 'webdataset' else 'image'
    loaded = _load(fmt, out, tmp_path)['train'].cast_column(column, datasets.Image(decode=False))[column]
    for original, stored in zip(originals, loaded, strict=True):
        before = Image.open(original['path'])
        after = Image.open(io.BytesIO(stored['bytes']))
        if max(before.size) <= 64:
            assert stored['bytes'] == Path(original['path']).read_bytes()
            continue
        scale = 64 / max(before.size)
        assert after.size == (round(before.width * scale), round(before.height * scale)) and max(after.size) == 64
        assert after.format == before.format  # JPEG stays JPEG (re-encoded at --quality), PNG stays PNG
        if after.format == 'PNG':  # lossless: exactly PIL's resize of the original
            want = before.resize(after.size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            assert np.array_equal(np.asarray(after), np.asarray(want))
        else:  # encoded again at --quality 70: its quantisation tables are PIL's for quality 70
            buffer = io.BytesIO()
            after.save(buffer, 'JPEG', quality=70)
            assert after.quantization == Image.open(buffer).quantization != before.quantization
    assert shards_main([f'imagefolder:{root}', str(tmp_path / 'bad'), '--shard-size', '2', '--max-size', '0']) == 2
    assert shards_main([f'imagefolder:{root}', str(tmp_path / 'bad'), '--shard-size', '2', '--quality', '101']) == 2


def test_max_size_turns_images_upright_as_readers_see_them(tmp_path):
    image = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8)[None, :, None], (40, 1, 3)))  # a left-right ramp
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: readers (datasets) turn it 90 degrees clockwise, to 40x120
    for label in 'ab':
        (tmp_path / 'src' / 'train' / label).mkdir(parents=True)
        image.save(tmp_path / 'src' / 'train' / label / '0.jpg', quality=95, exif=exif)
    out = tmp_path / 'shards'
    assert shards_main([f'imagefolder:{tmp_path / "src"}', str(out), '--shard-size', '1', '--max-size', '60']) == 0
    before = datasets.load_dataset('imagefolder', data_dir=str(tmp_path / 'src'), split='train')[0]['image']
    after = _load('webdataset', out, tmp_path)['train'][0]['jpg']
    assert before.size == (40, 120) and after.size == (20, 60)
    assert np.abs(np.asarray(after, np.float64) - np.asarray(before.resize((20, 60)), np.float64)).mean() < 4
    alone = tmp_path / 'alone'
    assert shards_main([f'imagefolder:{tmp_path / "src"}', str(alone), '--shard-size', '1', '--max-size']) == 0
    meta = json.loads((alone / shards.META_FILE).read_text())
    assert (meta['max_size'], meta['quality'], meta['splits']['train']['resized']) == (shards.DEFAULT_MAX_SIZE, 90, 0)
