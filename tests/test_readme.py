"""The README stays true: its Python API example runs as written, and its commands exist."""
import re

from conftest import REPO


def python_blocks():
    text = (REPO / 'README.md').read_text()
    return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_python_api_example_runs():
    blocks = [b for b in python_blocks() if 'create_distiller' in b]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], 'README.md', 'exec'), namespace)
    out, task = namespace['out'], namespace['task']
    assert set(out) == {'loss', 'output', 'loss_ce', 'loss_kd', 'loss_icd', 'tau'}
    assert out['loss_icd'].item() > 0 and out['loss_kd'].item() >= 0
    assert not any(m._forward_pre_hooks for m in task.student.modules())


def test_top_commands_are_make_targets():
    readme = (REPO / 'README.md').read_text()
    makefile = (REPO / 'Makefile').read_text()
    targets = re.findall(r'^make ([\w-]+)', readme, flags=re.M)
    assert {'demo', 'test'} <= set(targets)
    for target in targets:
        assert re.search(rf'^{re.escape(target)}:', makefile, flags=re.M), target
    assert 'make test' in (REPO / '.ci' / 'run').read_text()


def test_relative_links_and_images_exist():
    readme = (REPO / 'README.md').read_text()
    links = [t for t in re.findall(r'\]\(([^)#\s]+)[^)]*\)', readme) if not re.match(r'[a-z]+:', t)]
    assert 'benchmarks/results/quality.png' in links
    missing = [t for t in links if not (REPO / t).exists()]
    assert not missing, missing
