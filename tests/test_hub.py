"""Publishing and reusing students through the real huggingface_hub client, against the loopback Hub server."""
import csv
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from helpers import FAST, closed_port, hub_env, run_cli
from timm_icd.publish import render_card

REPO_ID = 'icd-tests/digits-student'


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def pushed(hub, tmp_path_factory, teacher_run, digits_small):
    """A distilled student trained and pushed by train_icd.py --push-to-hub."""
    tmp = tmp_path_factory.mktemp('pushed')
    out = tmp / 'run'
    result = run_cli('--teacher', f'local-dir:{teacher_run / "student"}', '--student', 'test_efficientnet',
                     '--dataset', digits_small, '--epochs', '1', '-b', '32', '--output', out, '--interpolation',
                     'bilinear', '--push-to-hub', REPO_ID, '--hub-license', 'cc-by-4.0', *FAST, env=hub_env(hub, tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, tmp


def test_push_then_plain_timm_loads_identical_model_in_a_fresh_process(hub, pushed, tmp_path):
    out, result, _ = pushed
    calls_before = len(hub.calls)
    files = hub.repos[REPO_ID]['branches']['main']['files']
    assert sorted(files) == ['README.md', 'config.json', 'distillation.json', 'model.safetensors']
    weights = safetensors.torch.load(files['model.safetensors'])
    assert not any(k.startswith('icd') for k in weights)  # the ICD heads never leave the run
    assert files['model.safetensors'] == (out / 'student' / 'model.safetensors').read_bytes()

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / 'x.pt')
    code = ("import sys, timm, torch\n"
            "x = torch.load(sys.argv[1])\n"
            "remote = timm.create_model('hf-hub:" + REPO_ID + "', pretrained=True).eval()\n"
            "local = timm.create_model('local-dir:' + sys.argv[2], pretrained=True).eval()\n"
            "with torch.no_grad():\n"
            "    print((remote(x) - local(x)).abs().max().item(), remote.pretrained_cfg['input_size'])\n")
    fresh = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'x.pt'), str(out / 'student')],
                           capture_output=True, text=True, env=hub_env(hub, tmp_path, token=False), timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    diff, size = fresh.stdout.split(maxsplit=1)
    assert float(diff) < 1e-6 and size.strip() == '(3, 16, 16)'
    assert any(m == 'GET' and p.endswith('/resolve/main/model.safetensors') for m, p in hub.calls[calls_before:])


def test_card_parses_validates_and_carries_the_runs_numbers(hub, pushed, teacher_run, digits_small):
    out, _, _ = pushed
    card = ModelCard(hub.repos[REPO_ID]['branches']['main']['files']['README.md'].decode())
    assert hub.validated_cards and hub.validated_cards[-1] == str(card)  # the server validated what was uploaded
    data = card.data
    assert data.library_name == 'timm' and data.license == 'cc-by-4.0'  # --hub-license
    assert {'image-classification', 'timm', 'knowledge-distillation', 'icd'} <= set(data.tags)
    assert data.base_model is None and data.datasets is None  # local teacher and local data
    meta = str(data.to_dict())
    assert str(digits_small) not in meta and str(teacher_run) not in meta  # local paths stay out of the metadata
    with open(out / 'summary.csv') as f:
        last = list(csv.DictReader(f))[-1]
    _, results = model_index_to_eval_results(data.to_dict()['model-index'])
    values = {r.metric_name: r.metric_value for r in results}
    assert values['top-1 accuracy'] == pytest.approx(float(last['eval_top1']), abs=1e-4)
    assert values['top-5 accuracy'] == pytest.approx(float(last['eval_top5']), abs=1e-4)
    record = json.loads((out / 'student' / 'distillation.json').read_text())
    text = card.text
    assert f"{record['top1']:.2f}" in text and f"{record['teacher']['top1']:.2f}" in text
    assert f"hf-hub:{REPO_ID}" in text and 'arXiv:2407.11802' in text
    # published text names local data and teachers by their folder names only; the run folder keeps full paths
    assert str(digits_small) in record['command'] and str(teacher_run) in record['teacher']['name']
    assert str(digits_small) not in text and str(teacher_run) not in text and str(out) not in text
    public = json.loads(hub.repos[REPO_ID]['branches']['main']['files']['distillation.json'])
    assert public['command'] in text and public['dataset']['name'] == Path(digits_small).name
    assert public['teacher']['name'] == 'local-dir:student' and str(out) not in json.dumps(public)
    assert public['top1'] == record['top1'] and public['loss_weights'] == record['loss_weights']
    assert f"tau {record['icd']['tau_final']:.3f}" in text


def test_card_names_hub_dataset_base_model_and_baseline():
    record = {
        'student': 'mobilenetv3_small_100', 'method': 'icd+kd', 'epochs': 240, 'epoch': 239, 'top1': 71.5,
        'top5': 91.25, 'command': 'train_icd.py --dataset uoft-cs/cifar100',
        'teacher': {'name': 'resnet50', 'source': 'timm:resnet50', 'hf_hub_id': 'timm/resnet50.a1_in1k',
                    'num_classes': 100, 'top1': 79.1, 'top5': 94.0},
        'loss_weights': {'task': 1.0, 'kd': 1.0, 'icd': 1.0}, 'kd_temperature': 4.0,
        'icd': {'feat_dim': 128, 'alpha': 0.5, 'negatives': 'local', 'max_tau': 10.0, 'tau_final': 9.5},
        'dataset': {'name': 'uoft-cs/cifar100', 'train_split': 'train', 'eval_split': 'test', 'num_classes': 100,
                    'train_rows': 50000, 'eval_rows': 10000}}
    baseline = {'student': 'mobilenetv3_small_100', 'top1': 68.25, 'top5': 90.5}
    config = {'architecture': 'mobilenetv3_small_100', 'label_names': ['apple', 'aquarium_fish'],
              'pretrained_cfg': {'input_size': [3, 32, 32]}}
    card = ModelCard(str(render_card(record, config, 'org/mnv3-cifar100', baseline=baseline)))
    # the teacher is a tag, not the base model: a from-scratch student is no fine-tune of its teacher
    assert card.data.datasets == ['uoft-cs/cifar100'] and card.data.base_model is None
    assert 'teacher:timm/resnet50.a1_in1k' in card.data.tags
    assert 'Published under `apache-2.0`' in card.text and "ImageNet's non-commercial terms" in card.text
    assert 'Invariant Consistency Distillation' in card.text and 'arXiv 2407.11802' in card.text
    licensed = render_card(record, config, 'o/m', license='cc-by-nc-4.0')
    assert licensed.data.license == 'cc-by-nc-4.0' and 'Published under `cc-by-nc-4.0`' in licensed.text
    pretrained = render_card({**record, 'student_hf_hub_id': 'timm/mobilenetv3_small_100.lamb_in1k'}, config, 'o/m')
    assert pretrained.data.base_model == 'timm/mobilenetv3_small_100.lamb_in1k'  # started from those weights
    assert '| `mobilenetv3_small_100` | student trained without distillation | 68.25 | 90.50 |' in card.text
    assert '| `resnet50` | teacher | 79.10 | 94.00 |' in card.text
    assert 'standardi' not in card.text.lower()  # a record from before --kd-standardize, without the key
    for flag in (False, True):
        text = ModelCard(str(render_card({**record, 'kd_standardize': flag}, config, 'org/mnv3-cifar100'))).text
        assert ('KD temperature 4.0, with logit standardisation (Sun et al., CVPR 2024).' in text) == flag
        assert ('title     = {Logit Standardization in Knowledge Distillation}' in text) == flag


def test_second_push_updates_the_repository(hub, pushed, tmp_path):
    out, _, _ = pushed
    commits = len(hub.repos[REPO_ID]['commits'])
    result = run_cli(out / 'student', REPO_ID, command='push', env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'pushed {out / "student"} to {hub.endpoint}/{REPO_ID}/commit/' in result.stdout
    assert len(hub.repos[REPO_ID]['commits']) == commits + 1


def test_private_push_to_a_branch(hub, pushed, tmp_path):
    out, _, _ = pushed
    result = run_cli(out / 'student', 'icd-tests/private-one', '--private', '--revision', 'dev',
                     command='push', env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos['icd-tests/private-one']
    assert repo['private'] and 'model.safetensors' in repo['branches']['dev']['files']
    assert not repo['branches']['main']['files']


def test_the_token_is_never_printed_or_written(hub, pushed):
    _, result, tmp = pushed
    assert hub.token not in result.stdout + result.stderr
    for path in tmp.rglob('*'):  # the run folder and the Hub cache alike
        if path.is_file():
            assert hub.token.encode() not in path.read_bytes(), path


@pytest.mark.parametrize('case,expected', [
    ('no-token', r'error: no Hugging Face token: set HF_TOKEN or run `hf auth login`'),
    ('bad-repo-id', r"error: bad Hub repo id 'not a repo!!'"),
    ('refused', r'error: push to icd-tests/digits-student failed: cannot reach the Hub at http://127\.0\.0\.1:\d+ '
                r'\(ConnectError.*The run folder is unchanged; retry with `python -m timm_icd push'),
    ('dropped', r'error: push to icd-tests/digits-student failed: cannot reach the Hub at .*disconnected.*The run '
                r'folder is unchanged'),
    ('bad-token', r'error: push to icd-tests/digits-student failed: the Hub at .* rejected the token \(401\)'),
])
def test_push_failures_are_one_line_and_leave_the_run_unchanged(case, expected, hub, pushed, tmp_path):
    out, _, _ = pushed
    before = snapshot(out)
    endpoint = f'http://127.0.0.1:{closed_port()}' if case == 'refused' else None
    env = hub_env(hub, tmp_path, token=case != 'no-token', endpoint=endpoint)
    repo_id = 'not a repo!!' if case == 'bad-repo-id' else REPO_ID
    if case == 'bad-token':
        env['HF_TOKEN'] = 'hf_wrong_token'
    if case == 'dropped':
        hub.mode = 'drop'
    try:
        result = run_cli(out / 'student', repo_id, command='push', env=env, timeout=300)
    finally:
        hub.mode = 'ok'
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr[-2000:]
    assert 'hf_wrong_token' not in result.stderr and hub.token not in result.stderr
    assert snapshot(out) == before


def test_train_icd_checks_the_push_target_before_training(hub, digits_small, tmp_path):
    out = tmp_path / 'never'
    result = run_cli('--dataset', digits_small, '--student', 'test_resnet', '--method', 'vanilla', '--output', out,
                     '--push-to-hub', REPO_ID, *FAST, env=hub_env(hub, tmp_path, token=False))
    assert result.returncode == 2 and 'error: no Hugging Face token' in result.stderr
    assert not out.exists()


def garbage_server():
    """A loopback server that answers every request with an HTTP 200 web page, not the Hub's JSON: its endpoint."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            with conn:
                conn.recv(65536)
                body = b'<html>captive portal</html>'
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n'
                             b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
    threading.Thread(target=serve, daemon=True).start()
    return server, f'http://127.0.0.1:{server.getsockname()[1]}'


@pytest.mark.parametrize('case,expected', [
    ('refused', r'cannot reach the Hub at http://127\.0\.0\.1:\d+ \(ConnectError'),
    ('dropped', r'cannot reach the Hub at .*disconnected'),
    ('garbage', r"the server at http://127\.0\.0\.1:\d+ answered not the Hub's answer: '<html>captive"),
    ('bad-token', r'the Hub at .* rejected the token \(401\)'),
])
def test_an_unusable_hub_is_refused_before_training(case, expected, hub, digits_small, tmp_path):
    out, server = tmp_path / 'never', None
    endpoint = f'http://127.0.0.1:{closed_port()}' if case == 'refused' else None
    if case == 'garbage':
        server, endpoint = garbage_server()
    env = hub_env(hub, tmp_path, endpoint=endpoint)
    if case == 'bad-token':
        env['HF_TOKEN'] = 'hf_wrong_token'
    hub.mode = 'drop' if case == 'dropped' else 'ok'
    try:
        result = run_cli('--dataset', digits_small, '--student', 'test_resnet', '--method', 'vanilla', '--output',
                         out, '--push-to-hub', REPO_ID, *FAST, env=env, timeout=120)
    finally:
        hub.mode = 'ok'
        if server is not None:
            server.close()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f'error: --push-to-hub {REPO_ID}: ') and re.search(expected, lines[0]), lines[0]
    assert lines[0].endswith('checked before training, so nothing ran. Fix it, or train without --push-to-hub and '
                             'push later with `python -m timm_icd push`.')
    assert not out.exists() and 'hf_wrong_token' not in result.stderr  # before epoch 0: no run folder at all


def test_validate_and_load_published_student(hub, pushed, digits_small, tmp_path):
    out, _, _ = pushed
    with open(out / 'summary.csv') as f:
        last = list(csv.DictReader(f))[-1]
    result = run_cli('--model', f'hf-hub:{REPO_ID}', '--dataset', digits_small, '--results-file',
                     tmp_path / 'r.json', '-j', '0', command='validate', env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / 'r.json').read_text())
    assert results['top1'] == pytest.approx(float(last['eval_top1']), abs=1e-9)
    assert results['images'] == 72 and results['images_per_second'] > 0
    assert f'hf-hub:{REPO_ID} on {digits_small} [test]: top-1' in result.stdout


def test_distillation_starts_from_published_weights(hub, pushed, digits_small, tmp_path):
    out = tmp_path / 'finetune'
    result = run_cli('--student', f'hf-hub:{REPO_ID}', '--method', 'vanilla', '--dataset', digits_small, '--epochs',
                     '1', '-b', '32', '--lr', '1e-9', '--weight-decay', '0', '--output', out, *FAST,
                     env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    published = safetensors.torch.load(hub.repos[REPO_ID]['branches']['main']['files']['model.safetensors'])
    trained = safetensors.torch.load_file(out / 'student' / 'model.safetensors')
    weights = [k for k in published if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(weights) > 20
    for key in weights:  # lr 1e-9 for one epoch: the weights are still the published ones
        torch.testing.assert_close(trained[key], published[key], rtol=0, atol=1e-6, msg=key)
