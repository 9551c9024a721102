"""Every library notebook runs as a test case; the generated package must match the notebooks; notebooks are clean."""
import filecmp, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / 'nbs').glob('*.ipynb'))
BIN = Path(sys.executable).parent
# nbdev's test_nb sets IN_TEST=1, which makes nbdev_export a no-op in child processes
ENV = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}


@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb):
    import nbdev.test as nbt  # imported as a module so pytest does not collect `test_nb` itself
    ok, secs = nbt.test_nb(nb, skip_flags=['notest', 'slow', 'gpu'])
    assert ok, f'{nb.name} failed (traceback above)'


def _diff(a: Path, b: Path):
    cmp = filecmp.dircmp(a, b, ignore=['__pycache__'])
    out = [f'only in generated: {x}' for x in cmp.left_only] + [f'only in repo: {x}' for x in cmp.right_only]
    out += [f'differs: {x}' for x in cmp.diff_files]
    return out


def test_library_matches_notebooks(tmp_path):
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs')
    subprocess.run([str(BIN / 'nbdev_export')], cwd=tmp_path, check=True, capture_output=True, env=ENV)
    diffs = _diff(tmp_path / 'vilseg', ROOT / 'vilseg')
    assert not diffs, 'vilseg/ is not what nbdev_export makes of nbs/ (run `make export`): ' + '; '.join(diffs)


def test_notebooks_are_clean(tmp_path):
    shutil.copy(ROOT / 'settings.ini', tmp_path)
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs')
    subprocess.run([str(BIN / 'nbdev_clean')], cwd=tmp_path, check=True, capture_output=True, env=ENV)
    dirty = [str(p.relative_to(tmp_path / 'nbs')) for p in (tmp_path / 'nbs').rglob('*.ipynb')
             if p.read_bytes() != (ROOT / 'nbs' / p.relative_to(tmp_path / 'nbs')).read_bytes()]
    assert not dirty, f'notebooks not clean (run `make export`): {dirty}'


def test_experiment_notebooks_keep_parameters_tag():
    import json
    for nb in (ROOT / 'nbs' / 'experiments').glob('*.ipynb'):
        cells = json.loads(nb.read_text())['cells']
        assert any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells), f'{nb.name}: no parameters cell'
