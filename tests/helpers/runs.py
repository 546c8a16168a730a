"""Reading a finished run back: its summary rows, and its student's top-1 measured with timm alone."""
import csv

import timm
import torch
from timm.data import create_transform, resolve_data_config

from timm_icd.data import ImageClassificationDataset, load_image_data


def read_summary(run_dir):
    """The rows of a run's summary.csv, one per epoch."""
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


def eval_with_timm(model_dir, dataset, data_config_of=None):
    """Top-1 (%) of a saved student on the eval split, using only timm and its own config (or, but for the
    normalisation, another folder's: how a run measures its teacher, with the student's eval preprocessing)."""
    model = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    cfg = resolve_data_config(model=model)
    if data_config_of is not None:
        other = resolve_data_config(model=timm.create_model(f'local-dir:{data_config_of}', pretrained=False))
        cfg = {**other, 'mean': cfg['mean'], 'std': cfg['std']}
    data = load_image_data(dataset)
    ds = ImageClassificationDataset(data.eval, data.image_column, data.label_column, create_transform(**cfg))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(x)
    return 100.0 * (logits.argmax(1) == y).sum().item() / len(y), model, x
