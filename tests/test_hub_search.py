"""Finding, comparing and reusing published students: search, multi-model validate, a published student as the next
teacher, a published student fine-tuned on new data, and collections, all through the real huggingface_hub client
against the loopback Hub (``hub_server.py``)."""
import csv
import json
import re
import shutil
import subprocess
import sys

import datasets
import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import FAST, closed_port, hub_env, run_cli
from timm_icd.base import UserError
from timm_icd.cli.hub import main as hub_main
from timm_icd.cli.push import main as push_main
from timm_icd.cli.train import main as train_main
from timm_icd.data import digits_dataset
from timm_icd.publish import PublishedStudent, check_claim, count_macs, count_parameters, matches, sort_students
from timm_icd.run import parse_and_validate

VANILLA = 'org-a/resnet-vanilla'  # the teacher_run fixture's student, pushed with python -m timm_icd push
EFFNET = 'org-b/effnet-icd'  # distilled from hf-hub:VANILLA, pushed by train_icd.py into a collection
FINETUNED = 'org-b/effnet-digits-new'  # hf-hub:EFFNET fine-tuned with KD on new data
NO_MATCH = 'no published timm_icd student matches these filters.'


def client(hub, tmp_path, code: str) -> str:
    """Run ``code`` (with ``api``, a real ``HfApi``) against ``hub`` in a fresh process; its standard output."""
    result = subprocess.run([sys.executable, '-c', 'from huggingface_hub import HfApi\napi = HfApi()\n' + code],
                            capture_output=True, text=True, env=hub_env(hub, tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def record_of(folder) -> dict:
    return json.loads((folder / 'distillation.json').read_text())


@pytest.fixture(scope='module')
def digits_new(tmp_path_factory) -> str:
    """Digits the other fixtures never see: train rows 256-511 and test rows 72-143."""
    dd = digits_dataset()
    path = tmp_path_factory.mktemp('data') / 'digits_new'
    datasets.DatasetDict(train=dd['train'].select(range(256, 512)),
                         test=dd['test'].select(range(72, 144))).save_to_disk(path)
    return str(path)


@pytest.fixture(scope='module')
def collection(hub, tmp_path_factory) -> str:
    return client(hub, tmp_path_factory.mktemp('c'), "print(api.create_collection('Digits', namespace='org-b').slug)"
                  ).strip()


@pytest.fixture(scope='module')
def vanilla(hub, tmp_path_factory, teacher_run):
    tmp = tmp_path_factory.mktemp('vanilla')
    result = run_cli(teacher_run / 'student', VANILLA, command='push', env=hub_env(hub, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return teacher_run / 'student'


@pytest.fixture(scope='module')
def next_run(hub, tmp_path_factory, vanilla, digits_small, collection):
    """A published student as the next teacher; the new student pushed with its tags, into a collection."""
    tmp = tmp_path_factory.mktemp('next')
    result = run_cli('--teacher', f'hf-hub:{VANILLA}', '--student', 'test_efficientnet', '--dataset', digits_small,
                     '--epochs', '1', '-b', '32', '--output', tmp / 'run', '--push-to-hub', EFFNET, '--hub-collection',
                     collection, *FAST, env=hub_env(hub, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / 'run'


@pytest.fixture(scope='module')
def finetune_run(hub, tmp_path_factory, next_run, digits_new):
    """A published student fine-tuned with KD on new data (lr 1e-9: its weights stay the published ones)."""
    tmp = tmp_path_factory.mktemp('finetune')
    result = run_cli('--student', f'hf-hub:{EFFNET}', '--teacher', f'hf-hub:{VANILLA}', '--method', 'kd',
                     '--dataset', digits_new, '--epochs', '1', '-b', '32', '--lr', '1e-9', '--weight-decay', '0',
                     '--output', tmp / 'run', '--push-to-hub', FINETUNED, *FAST, env=hub_env(hub, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / 'run'


@pytest.fixture(scope='module')
def published(hub, vanilla, next_run, finetune_run) -> dict:
    """The three students on the Hub (and one tagged repository without a distillation.json), their records."""
    hub.put('org-c/no-record', {'README.md': b'---\nlibrary_name: timm\ntags:\n- timm_icd\n---\nNo record.\n'})
    return {VANILLA: record_of(vanilla), EFFNET: record_of(next_run / 'student'),
            FINETUNED: record_of(finetune_run / 'student')}


def test_a_published_student_teaches_the_next_one(hub, vanilla, next_run):
    record = record_of(next_run / 'student')
    teacher = record['teacher']
    assert teacher['name'] == f'hf-hub:{VANILLA}' and teacher['hf_hub_id'] == VANILLA
    assert teacher['source'] == f'hf-hub:{VANILLA}' and teacher['architecture'] == 'test_resnet'
    assert record['method'] == 'icd+kd' and record['architecture'] == 'test_efficientnet'
    assert record['parameters'] == count_parameters(timm.create_model(f'local-dir:{next_run / "student"}'))
    assert ('GET', f'/{VANILLA}/resolve/main/model.safetensors') in hub.calls  # the teacher's weights came from it
    assert teacher['num_classes'] == 10 and teacher['top1'] > 50  # measured by this run: the trained teacher
    meta = hub.card_metadata(hub.repos[EFFNET])
    assert 'base_model' not in meta  # trained from scratch: no fine-tune of its teacher; the teacher is a tag
    assert {'timm_icd', 'method:icd+kd', f'teacher:{VANILLA}'} <= set(meta['tags'])


def test_a_published_student_fine_tuned_on_new_data_starts_from_its_weights(hub, finetune_run, digits_new):
    record = record_of(finetune_run / 'student')
    assert record['student_hf_hub_id'] == EFFNET and hub.card_metadata(hub.repos[FINETUNED])['base_model'] == EFFNET
    assert record['student'] == f'hf-hub:{EFFNET}' and record['architecture'] == 'test_efficientnet'
    assert record['method'] == 'kd' and record['teacher']['hf_hub_id'] == VANILLA
    assert record['dataset']['name'] == digits_new and record['dataset']['train_rows'] == 256
    published = safetensors.torch.load(hub.repos[EFFNET]['branches']['main']['files']['model.safetensors'])
    trained = safetensors.torch.load_file(finetune_run / 'student' / 'model.safetensors')
    weights = [k for k in published if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(weights) > 20
    for key in weights:  # a fresh test_efficientnet would differ in every one
        torch.testing.assert_close(trained[key], published[key], rtol=0, atol=1e-6, msg=key)


def test_hub_collection_holds_the_pushed_student(hub, next_run, collection, tmp_path):
    code = f"print([(i.item_id, i.item_type) for i in api.get_collection('{collection}').items])"
    items = client(hub, tmp_path, code)
    assert items.strip() == f"[('{EFFNET}', 'model')]"


def _search(hub, tmp_path, *args, endpoint=None):
    return run_cli('search', *args, command='hub', env=hub_env(hub, tmp_path, endpoint=endpoint), timeout=300)


def test_search_by_method_prints_a_table_of_the_one_match(hub, published, tmp_path):
    result = _search(hub, tmp_path, '--method', 'icd+kd')
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ['model', 'architecture', 'teacher', 'dataset', 'method', 'top-1', 'params', 'downloads']
    assert len(rows) == 1
    record = published[EFFNET]
    cells = rows[0].split()
    assert cells[:6] == [EFFNET, 'test_efficientnet', VANILLA, 'digits_small', 'icd+kd', f"{record['top1']:.2f}"]
    assert cells[7] == str(hub.repos[EFFNET]['downloads'])
    assert hub.listings[-1]['filter'] == ['timm_icd', 'method:icd+kd']  # the Hub filtered on the pushed tags


def test_search_json_sorted_by_accuracy_with_every_field(hub, published, tmp_path):
    result = _search(hub, tmp_path, '--json', '--sort', 'accuracy')
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    assert sorted(s['repo_id'] for s in found) == sorted(published)
    assert [s['top1'] for s in found] == sorted((s['top1'] for s in found), reverse=True)
    assert 'note: skipped org-c/no-record: no distillation.json' in result.stderr
    for student in found:
        record = published[student['repo_id']]
        assert student['top1'] == pytest.approx(record['top1'], abs=1e-4)  # the card's model-index, 4 decimals
        assert student['top5'] == pytest.approx(record['top5'], abs=1e-4)
        assert student['architecture'] == record['architecture'] and student['parameters'] == record['parameters']
        assert student['method'] == record['method'] and student['split'] == 'test'
        assert student['downloads'] == hub.repos[student['repo_id']]['downloads']
        assert student['teacher'] == (record['teacher'] or {}).get('name')
    assert {s['repo_id']: s['dataset'] for s in found} == {VANILLA: 'digits_small', EFFNET: 'digits_small',
                                                           FINETUNED: 'digits_new'}
    assert hub.repos[VANILLA]['downloads'] >= 2  # the two runs that loaded it as their teacher


@pytest.mark.parametrize('args,expected', [
    (['--author', 'org-b', '--sort', 'recent'], [FINETUNED, EFFNET]),
    (['--student', 'TEST_EFFICIENT*', '--teacher', 'test_resnet', '--sort', 'downloads'], 'by downloads'),
    (['--dataset', '{digits_new}'], [FINETUNED]),
], ids=['author-recent', 'student-teacher-downloads', 'local-dataset-path'])
def test_search_filters(args, expected, hub, published, digits_new, tmp_path):
    args = [a.format(digits_new=digits_new) for a in args]
    result = _search(hub, tmp_path, '--json', *args)
    assert result.returncode == 0, result.stderr[-3000:]
    found = [s['repo_id'] for s in json.loads(result.stdout)]
    if expected == 'by downloads':
        expected = sorted([EFFNET, FINETUNED], key=lambda r: (-hub.repos[r]['downloads'], r))
        assert hub.listings[-1]['sort'] == ['downloads']
    assert found == expected
    if '--author' in args:
        assert hub.listings[-1]['author'] == ['org-b']


def test_search_without_match_or_hub_is_one_line(hub, published, tmp_path):
    result = _search(hub, tmp_path, '--method', 'dkd')
    assert result.returncode == 0 and result.stdout.strip() == NO_MATCH, result.stderr[-2000:]
    result = _search(hub, tmp_path, '--method', 'kd', endpoint=f'http://127.0.0.1:{closed_port()}')
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and not result.stdout
    assert len(lines) == 1 and re.fullmatch(r'error: cannot reach the Hub at http://127\.0\.0\.1:\d+ \(ConnectError.*',
                                            lines[0]), result.stderr[-2000:]


def test_validate_compares_several_models_and_marks_a_wrong_claim(hub, published, teacher_run, next_run,
                                                                  digits_small, tmp_path):
    claims_more = tmp_path / 'claims-more'
    shutil.copytree(teacher_run / 'student', claims_more)
    record = record_of(claims_more)
    measured = record['top1']
    record['top1'] = measured + 5 if measured < 90 else measured - 5
    (claims_more / 'distillation.json').write_text(json.dumps(record))
    card_only = dict(hub.repos[EFFNET]['branches']['main']['files'])  # a student that claims in its card only
    del card_only['distillation.json']
    hub.put('org-c/card-only', card_only)
    md, table = tmp_path / 'cmp.md', tmp_path / 'cmp.csv'
    result = run_cli('--model', claims_more, f'hf-hub:{EFFNET}', 'hf-hub:org-c/card-only', '--dataset', digits_small,
                     '-j', '0',
                     '--results-md', md, '--results-csv', table, '--results-file', tmp_path / 'r.json',
                     command='validate', env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(table) as f:
        local, remote, card = rows = list(csv.DictReader(f))
    assert [r['model'] for r in rows] == [str(claims_more), f'hf-hub:{EFFNET}', 'hf-hub:org-c/card-only']
    assert float(local['top1']) == pytest.approx(measured, abs=1e-9)
    assert local['claim'] == 'DIFFERS' and float(local['claimed_top1']) == record['top1']
    assert local['claimed_on'] == str(claims_more / 'distillation.json')
    assert float(remote['top1']) == pytest.approx(published[EFFNET]['top1'], abs=1e-9) and remote['claim'] == 'ok'
    assert remote['claimed_on'] == f'hf-hub:{EFFNET}/distillation.json'
    assert card['top1'] == remote['top1'] and card['claim'] == 'ok' and card['claimed_on'].endswith('model card')
    assert float(card['claimed_top1']) == round(published[EFFNET]['top1'], 4)  # the model-index's value
    for row, folder in ((local, claims_more), (remote, next_run / 'student')):
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 16, 16))
        assert int(row['macs']) == counter.get_total_flops() // 2 > 0
        assert float(row['gmacs']) == pytest.approx(int(row['macs']) / 1e9, rel=1e-12)
        assert int(row['parameters']) == sum(p.numel() for p in model.parameters())
        assert float(row['top5']) >= float(row['top1']) and float(row['images_per_second']) > 0
        assert row['input_size'] == '3x16x16' and row['images'] == '72'
    text = md.read_text()
    table_rows = [line for line in text.splitlines() if line.startswith('| `')]
    assert len(table_rows) == 3 and table_rows[0].endswith('| DIFFERS |') and table_rows[1].endswith('| ok |')
    assert f"| {record['top1']:.2f} |" in table_rows[0] and 'within 0.5 points' in text
    assert text in result.stdout  # the table is printed too
    assert [r['model'] for r in json.loads((tmp_path / 'r.json').read_text())] == [r['model'] for r in rows]


def test_macs_are_counted_as_by_hand():
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), (3, 4, 4)) == 48 * 10
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_macs(conv, (3, 16, 16)) == 8 * 16 * 16 * (3 * 3 * 3) and count_parameters(conv) == 8 * 27


def test_claim_checks():
    claims = {'top1': 80.0, 'dataset': '/data/digits', 'split': 'test'}
    assert check_claim(80.4, claims, 'digits', 'test') == 'ok'
    assert check_claim(80.6, claims, '/elsewhere/digits', 'test') == 'DIFFERS'
    assert check_claim(80.6, claims, '/elsewhere/digits', 'test', tolerance=1.0) == 'ok'
    assert check_claim(50.0, claims, 'digits', 'validation') == 'other data'
    assert check_claim(50.0, claims, 'uoft-cs/cifar100', 'test') == 'other data'
    assert check_claim(50.0, {}, 'digits', 'test') == ''


def _student(repo_id, **kwargs) -> PublishedStudent:
    fields = dict(architecture='resnet18', teacher='resnet50', teacher_architecture='resnet50', dataset='digits',
                  split='test', method='icd+kd', top1=70.0, top5=90.0, parameters=11_000_000, downloads=0,
                  last_modified='2025-01-01T00:00:00+00:00')
    return PublishedStudent(repo_id=repo_id, **{**fields, **kwargs})


def test_filters_and_sorting_on_records():
    hub_teacher = _student('a/x', teacher='hf-hub:b/teacher', teacher_architecture='vit_small_patch16_224')
    assert matches(hub_teacher, teacher='b/teacher') and matches(hub_teacher, teacher='hf-hub:b/teacher')
    assert matches(hub_teacher, teacher='VIT_*') and not matches(hub_teacher, teacher='resnet50')
    plain = _student('a/y', dataset='uoft-cs/cifar100')
    assert matches(plain, architecture='resnet*', dataset='UOFT-CS/cifar100', author='a', method='icd+kd')
    assert not matches(plain, architecture='resnet50') and not matches(plain, author='b')
    assert not matches(plain, method='icd') and not matches(plain, dataset='cifar100')
    assert matches(_student('a/z', dataset='digits_new'), dataset='/some/where/digits_new')
    students = [_student('a/low', top1=50.0, downloads=9), _student('a/none', top1=None, downloads=None),
                _student('a/high', top1=90.0, downloads=1), _student('a/tie', top1=90.0, downloads=1,
                                                                     last_modified='2025-02-01T00:00:00+00:00')]
    assert [s.repo_id for s in sort_students(students, 'accuracy')] == ['a/high', 'a/tie', 'a/low', 'a/none']
    assert [s.repo_id for s in sort_students(students, 'downloads')] == ['a/low', 'a/high', 'a/tie', 'a/none']
    assert [s.repo_id for s in sort_students(students, 'recent')][0] == 'a/tie'


def test_bad_flags_and_collection_slugs_are_one_line(teacher_run, digits_small, tmp_path, capsys):
    assert hub_main(['search', '--sort', 'stars']) == 2
    assert capsys.readouterr().err.startswith("error: argument --sort: invalid choice: 'stars'")
    assert hub_main([]) == 2 and capsys.readouterr().err.startswith('error: the following arguments are required')
    base = ['--dataset', digits_small, '--student', 'test_resnet', '--method', 'vanilla', '--output', tmp_path / 'x']
    base = list(map(str, base))
    with pytest.raises(UserError, match='--hub-collection adds the pushed student to a collection: it needs'):
        parse_and_validate(base + ['--hub-collection', 'org/students-0123456789abcdef01234567'])
    for command in (lambda: train_main(base + ['--push-to-hub', 'org/x', '--hub-collection', 'org/no-id']),
                    lambda: push_main([str(teacher_run / 'student'), 'org/x', '--hub-collection', 'no-namespace'])):
        assert command() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.fullmatch(r"error: bad Hub collection slug '[\w/-]+': use the "
                                                           r"slug from the collection's URL, NAMESPACE/TITLE-ID.*", err)
    assert not (tmp_path / 'x').exists()
