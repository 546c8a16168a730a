"""The table of loss terms (timm_icd/distill/terms.py): the methods, flags, record and method table derived from it,
and a term registered from outside the package, trained through the CLI."""
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from timm_icd.distill import (
    METHOD_WEIGHTS, TERMS, DKDParams, KDParams, method_table, method_title, param_problems, register_loss)
from timm_icd.distill.methods import AUTO_ACROSS_SPACES, AUTO_SAME_SPACE
from timm_icd.distill.terms import record_of, split_settings
from timm_icd.publish import render_card
from timm_icd import UserError
from helpers import FAST, HELPERS, REPO, offline_env, read_summary, run_cli

PLUGIN = HELPERS / 'loss_plugin.py'
TABLE_HEADER = method_table().splitlines()[0]


def _documented_table() -> str:
    """The method table as the documentation holds it: wherever it lives (README.md or a docs/ page)."""
    for page in [REPO / 'README.md', *sorted((REPO / 'docs').rglob('*.md'))]:
        lines = page.read_text().splitlines()
        if TABLE_HEADER in lines:
            start = lines.index(TABLE_HEADER)
            end = next((i for i in range(start, len(lines)) if not lines[i].startswith('|')), len(lines))
            return '\n'.join(lines[start:end])
    raise AssertionError(f'no page holds the method table (header {TABLE_HEADER!r})')


def test_the_documented_method_table_is_the_rendered_one():
    assert _documented_table() == method_table()


def test_methods_are_the_tables_combinations_with_unchanged_weights_and_auto():
    assert list(METHOD_WEIGHTS) == ['vanilla', 'kd', 'dkd', 'dist', 'icd', 'icd+kd', 'icd+dkd', 'icd+dist']
    assert METHOD_WEIGHTS['kd'] == (0.1, 0.9, 0.0) and METHOD_WEIGHTS['icd+dist'] == (1.0, 1.0, 1.0)
    assert (AUTO_SAME_SPACE, AUTO_ACROSS_SPACES) == ('icd+kd', 'vanilla')
    assert [t.name for t in TERMS.values()] == ['kd', 'dkd', 'dist', 'icd', 'feature', 'token']
    assert TERMS['dkd'].hard_labels and not TERMS['icd'].same_label_space and TERMS['dist'].temperature == 1.0
    assert method_title('icd+kd') == 'Invariant Consistency Distillation plus Hinton KD (ICD+KD)'
    assert method_title('dkd') == 'Decoupled Knowledge Distillation (DKD)'


def test_keywords_and_checks_come_from_the_parameter_dataclasses():
    params = split_settings({'dkd_beta': 8.0, 'kd_standardize': True}, {'dkd': DKDParams(alpha=0.5)})
    assert params == {'dkd': DKDParams(alpha=0.5, beta=8.0), 'kd': KDParams(standardize=True)}
    with pytest.raises(TypeError, match="unexpected keyword argument 'dkd_gamma'"):
        split_settings({'dkd_gamma': 1.0})
    assert param_problems('dkd', DKDParams(beta=-1.0)) == ['--dkd-beta must be >= 0, got -1.0.']
    assert param_problems('kd', KDParams(temperature=0.0)) == ['--kd-temperature must be > 0, got 0.0.']
    assert param_problems('kd', KDParams()) == []


def test_register_loss_refuses_a_taken_name_and_mutable_params():
    @dataclass
    class Mutable:
        scale: float = 1.0
    with pytest.raises(UserError, match="'kd' is already registered"):
        register_loss('kd', lambda *a: None)
    with pytest.raises(UserError, match='frozen dataclass'):
        register_loss('mutable_term', lambda *a: None, Mutable)
    assert 'mutable_term' not in TERMS and 'mutable_term' not in METHOD_WEIGHTS


def test_the_plugins_term_matches_a_float64_reference(monkeypatch):
    """The plugin's function, taken from the file without registering it here, against float64 arithmetic."""
    import runpy
    import timm_icd
    registered = {}
    monkeypatch.setattr(timm_icd, 'register_loss', lambda name, fn, params, **kw: registered.update(
        name=name, fn=fn, params=params))
    runpy.run_path(str(PLUGIN))
    torch.manual_seed(0)
    s, t = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3
    got = registered['fn'](s, t, torch.arange(6), 2.0, False, registered['params'](scale=3.0))
    ref = 3.0 * (torch.softmax(s.double() / 2, 1) - torch.softmax(t.double() / 2, 1)).abs().sum(1).mean()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_the_model_card_names_the_logit_term_its_settings_and_its_bibtex_from_the_table():
    base = {'student': 'test_efficientnet', 'top1': 91.5, 'top5': 99.0, 'epochs': 2, 'epoch': 1, 'command': 'x',
            'loss_weights': {'task': 1.0, 'kd': 1.0, 'icd': 1.0}, 'teacher': None, 'icd': None,
            'dataset': {'name': 'digits', 'num_classes': 10, 'eval_split': 'test', 'eval_rows': 72,
                        'train_split': 'train', 'train_rows': 256}}
    config = {'architecture': 'test_efficientnet', 'num_classes': 10, 'pretrained_cfg': {'input_size': [3, 32, 32]}}
    dkd = str(render_card({**base, **record_of('icd+dkd', 'dkd', {'dkd': DKDParams(beta=8.0)})}, config, 'o/m'))
    assert ('- Decoupled Knowledge Distillation (DKD) ([Zhao et al., CVPR 2022](https://arxiv.org/abs/2203.08679)): '
            '`--dkd-alpha 1.0` `--dkd-beta 8.0` `--dkd-warmup-epochs 20`.') in dkd
    assert '@inproceedings{zhao2022dkd,' in dkd and 'huang2022dist' not in dkd and 'giakoumoglou2024icd' in dkd
    kd = str(render_card({**base, **record_of('kd', 'kd', {})}, config, 'o/m'))
    assert '- Hinton knowledge distillation (KD) ([Hinton et al., 2015](https://arxiv.org/abs/1503.02531)).' in kd
    assert '@article{hinton2015distilling,' in kd and 'zhao2022dkd' not in kd
    alone = str(render_card({**base, **record_of('vanilla', None, {})}, config, 'o/m'))
    assert 'hinton2015distilling' not in alone and 'Knowledge Distillation (DKD)' not in alone


def test_a_term_registered_from_a_file_trains_through_the_cli(digits_small, tmp_path):
    out = tmp_path / 'l1'
    result = run_cli('--student', 'test_resnet', '--teacher', 'test_resnet', '--teacher-pretrained', 'false',
                     '--dataset', digits_small, '--loss-plugin', PLUGIN, '--method', 'l1', '--l1-scale', '3',
                     '--task-loss-weight', '0', '--epochs', '1', '-b', '32', '--output', out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'l1' and record['logit_loss'] == 'l1' and record['l1'] == {'scale': 3.0}
    assert record['method_title'] == 'L1 between class probabilities (L1)' and record['dkd'] is None
    assert record['loss_weights'] == {'task': 0.0, 'kd': 1.0, 'icd': 0.0} and record['kd_temperature'] == 2.0
    # the model card names the term, its settings and its BibTeX from the record: a push needs no plugin loaded
    card = str(render_card(record, json.loads((out / 'student' / 'config.json').read_text()), 'org/l1-student'))
    assert '- L1 between class probabilities (L1) (a test term): `--l1-scale 3.0`.' in card
    assert '@misc{l1test, title = {A test term}}' in card and 'zhao2022dkd' not in card
    row = read_summary(out)[0]
    # CE at weight 0: the loss is the plugin's term alone, at most 3 * 2 (an L1 of two probability vectors)
    assert 0 < float(row['train_loss_kd']) <= 6.0
    assert float(row['train_loss']) == pytest.approx(float(row['train_loss_kd']), rel=1e-6)
    bad = run_cli('--teacher', 'test_resnet', '--loss-plugin', PLUGIN, '--method', 'l1', '--l1-scale', '-1',
                  '--dataset', digits_small, '--output', tmp_path / 'bad')
    assert bad.returncode == 2 and 'error: --l1-scale must be >= 0, got -1.0.' in bad.stderr


def test_the_entry_point_group_registers_a_packages_terms(tmp_path):
    """A package that names a module in the ``timm_icd.losses`` entry-point group has its terms registered."""
    site = tmp_path / 'site'
    (site / 'l1_terms-0.1.dist-info').mkdir(parents=True)
    (site / 'l1_terms-0.1.dist-info' / 'METADATA').write_text('Metadata-Version: 2.1\nName: l1-terms\nVersion: 0.1\n')
    (site / 'l1_terms-0.1.dist-info' / 'entry_points.txt').write_text('[timm_icd.losses]\nl1 = l1_terms\n')
    (site / 'l1_terms.py').write_text(PLUGIN.read_text())
    code = ('from timm_icd.distill import load_plugins, METHOD_WEIGHTS; print(load_plugins(), '
            "METHOD_WEIGHTS['icd+l1'])")
    env = offline_env(PYTHONPATH=f'{site}:{REPO}')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.fullmatch(r"\['l1'\] \(1\.0, 1\.0, 1\.0\)", result.stdout.strip())


def test_timm_token_distillation_trains_a_distilled_deit_student(digits_small, tmp_path):
    """timm train.py's ``--kd-distill-type token``: timm's TokenDistillationTask, through the table of terms."""
    out = tmp_path / 'token'
    result = run_cli('--model', 'deit_tiny_distilled_patch16_224', '--kd-model-name', 'test_resnet',
                     '--kd-distill-type', 'token', '--teacher-pretrained', 'false', '--kd-temperature', '2',
                     '--dataset', digits_small, '--epochs', '1', '-b', '32', '--output', out, *FAST,
                     '--input-size', '3', '32', '32')
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    assert record['method'] == 'token' and record['token'] == {'distill_type': 'soft'}
    assert record['loss_weights'] == {'task': 1.0, 'kd': 1.0, 'icd': 0.0} and record['kd_temperature'] == 2.0
    assert record['architecture'] == 'deit_tiny_distilled_patch16_224'
    row = read_summary(out)[0]
    # the loss is CE on the class head plus the distillation head's KL (weights 1 and 1), averaged over the epoch
    assert float(row['train_loss']) == pytest.approx(float(row['train_loss_ce']) + float(row['train_loss_kd']),
                                                     rel=1e-5)
    assert float(row['train_loss_kd']) > 0 and float(row['train_loss_icd']) == 0


def test_a_config_file_names_plugins_too(tmp_path):
    """``loss_plugin`` in a ``--config`` file is loaded before the flags are parsed, like ``--loss-plugin``."""
    (tmp_path / 'run.yaml').write_text(f'loss_plugin: [{PLUGIN}]\nmethod: icd+l1\nl1_scale: 2.5\n')
    code = ('from timm_icd.run.flags import parse_args, term_params; '
            f"a = parse_args(['--teacher', 'test_resnet', '--config', '{tmp_path / 'run.yaml'}']); "
            "print(a.method, term_params(a)['l1'].scale)")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=offline_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'icd+l1 2.5'
