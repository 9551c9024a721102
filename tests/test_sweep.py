"""The sweep driver (`vilseg.sweep`, `vilseg sweep`) on a trivial papermill notebook: expansion, validation, skipping
finished runs, failures recorded while the others finish, `--jobs 2`, a killed sweep relaunched, and the table."""
import json, os, signal, statistics, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest

from vilseg.sweep import SpecError, expand, load_spec, run_sweep

ROOT = Path(__file__).resolve().parents[1]
VILSEG = [sys.executable, '-c', 'from vilseg.cli import main; main()']


def trivial_notebook(path):
    """Parameters x, y, seed, sleep, fail_x, flag, resume, out_dir. Raises when x == fail_x and the file `flag` exists
    (so a test can mend the failure without changing the spec); refuses a non-empty out_dir unless resume."""
    cells = [("x = 1\ny = 'a'\nseed = 0\nsleep = 0.0\nfail_x = None\nflag = ''\nresume = False\nout_dir = 'out'", ['parameters']),
             ("import json, os, pathlib, time\nd = pathlib.Path(out_dir)\n"
              "if d.exists() and any(d.iterdir()) and not resume: raise FileExistsError(f'{d} is not empty')\n"
              "time.sleep(sleep)\n"
              "if x == fail_x and pathlib.Path(flag).exists(): raise ValueError(f'boom at x {x}')\n"
              "d.mkdir(parents=True, exist_ok=True)\n"
              "(d / 'metrics.json').write_text(json.dumps({'score': x * 10 + seed, 'omp': int(os.environ['OMP_NUM_THREADS']),\n"
              "                                            'resumed': int(bool(resume)), 'nested': {'a': seed}, 'name': 'text'}))", [])]
    nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': f'c{i}', 'metadata': {'tags': t}, 'outputs': [], 'source': s}
                    for i, (s, t) in enumerate(cells)],
          'metadata': {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}, 'nbformat': 4, 'nbformat_minor': 5}
    Path(path).write_text(json.dumps(nb))
    return Path(path)


@pytest.fixture
def nb(tmp_path):
    return trivial_notebook(tmp_path / 'trivial.ipynb')


def write_spec(tmp_path, text, name='sw.yaml'):
    p = tmp_path / name; p.write_text(text); return p


def test_expansion_grid_settings_seeds(tmp_path, nb):
    sw = load_spec(write_spec(tmp_path, f"""notebook: {nb}
fixed: {{y: b}}
grid: {{x: [1, 2], sleep: [0, 0.5]}}
settings: {{plain: {{}}, other: {{y: c}}}}
seeds: [0, 1, 2]
"""))
    runs = expand(sw)
    assert len(runs) == 2 * 2 * 2 * 3
    assert [r.name for r in runs[:4]] == ['plain-x=1-sleep=0-s0', 'plain-x=1-sleep=0-s1', 'plain-x=1-sleep=0-s2', 'plain-x=1-sleep=0.5-s0']
    assert runs[-1].name == 'other-x=2-sleep=0.5-s2' and runs[-1].params == {'y': 'c', 'x': 2, 'sleep': 0.5, 'seed': 2}
    assert runs[0].params == {'y': 'b', 'x': 1, 'sleep': 0, 'seed': 0}
    assert len({r.name for r in runs}) == len(runs)
    # order: seeds -- the same runs, seed by seed (a sweep cut short has every setting)
    by_seed = expand(load_spec(write_spec(tmp_path, f"notebook: {nb}\nfixed: {{y: b}}\ngrid: {{x: [1, 2], sleep: [0, 0.5]}}\n"
                                                      f"settings: {{plain: {{}}, other: {{y: c}}}}\nseeds: [0, 1, 2]\norder: seeds\n")))
    assert sorted(r.name for r in by_seed) == sorted(r.name for r in runs)
    assert [r.seed for r in by_seed] == [0] * 8 + [1] * 8 + [2] * 8
    assert [r.name for r in by_seed[:3]] == ['plain-x=1-sleep=0-s0', 'plain-x=1-sleep=0.5-s0', 'plain-x=2-sleep=0-s0']
    assert {r.name: r.params for r in by_seed} == {r.name: r.params for r in runs}
    # no settings, no seeds: the grid alone; nothing at all: one run
    assert [r.name for r in expand(load_spec(write_spec(tmp_path, f'notebook: {nb}\ngrid: {{x: [3, 4]}}\n')))] == ['x=3', 'x=4']
    assert [(r.name, r.params) for r in expand(load_spec(write_spec(tmp_path, f'notebook: {nb}\nfixed: {{x: 5}}\n')))] == [('run', {'x': 5})]
    # named settings with YAML merge keys, as the ablation specs use them
    sw = load_spec(write_spec(tmp_path, f'notebook: {nb}\nsettings:\n  a: &base {{x: 1, y: q}}\n  b: {{<<: *base, x: 2}}\n'))
    assert [(r.name, r.params) for r in expand(sw)] == [('a', {'x': 1, 'y': 'q'}), ('b', {'x': 2, 'y': 'q'})]


@pytest.mark.parametrize('body,key,words', [
    ('notebook: {nb}\ngird: {{x: [1]}}\n', 'gird', 'unknown key'),
    ('fixed: {{x: 1}}\n', 'notebook', 'missing'),
    ('notebook: nowhere/none.ipynb\n', 'notebook', 'no such notebook'),
    ('notebook: {nb}\ngrid: {{nope: [1, 2]}}\n', 'grid.nope', "declares no parameter 'nope'"),
    ('notebook: {nb}\nfixed: {{nope: 1}}\n', 'fixed.nope', "declares no parameter 'nope'"),
    ('notebook: {nb}\nsettings: {{a: {{nope: 1}}}}\n', 'settings.a.nope', "declares no parameter 'nope'"),
    ('notebook: {nb}\ngrid: {{x: []}}\n', 'grid.x', 'non-empty list'),
    ('notebook: {nb}\ngrid: {{x: 3}}\n', 'grid.x', 'non-empty list'),
    ('notebook: {nb}\nfixed: {{x: 1}}\ngrid: {{x: [1, 2]}}\n', 'grid.x', 'also in fixed'),
    ('notebook: {nb}\ngrid: {{x: [1, 2]}}\nsettings: {{a: {{x: 1}}}}\n', 'settings.a.x', 'also a grid parameter'),
    ('notebook: {nb}\nseeds: [0, 0]\n', 'seeds', 'repeated seed'),
    ('notebook: {nb}\nseeds: [a]\n', 'seeds', 'integers'),
    ('notebook: {nb}\nseeds: [0]\nseed_param: rng\n', 'seed_param', "declares no parameter 'rng'"),
    ('notebook: {nb}\nfixed: {{out_dir: elsewhere}}\n', 'fixed.out_dir', 'output folder'),
    ('notebook: {nb}\nresume_param: restart\n', 'resume_param', "declares no parameter 'restart'"),
    ('notebook: {nb}\ngrid: {{y: [a b, a_b]}}\n', 'grid', 'same folder name'),
    ('notebook: {nb}\norder: random\n', 'order', "'settings' or 'seeds'"),
    ('notebook: [unclosed\n', 'yaml', ''),
])
def test_spec_validation_errors(tmp_path, nb, body, key, words):
    p = write_spec(tmp_path, body.format(nb=nb))
    with pytest.raises(SpecError) as e: load_spec(p)
    msg = str(e.value)
    assert msg.startswith(f'{p}: {key}: ') and words in msg and '\n' not in msg, msg


def test_the_project_specs_validate():
    "Every spec under nbs/experiments/sweeps names parameters its notebook declares (papermill can parse them)."
    cwd = os.getcwd(); os.chdir(ROOT)
    try:
        specs = sorted((ROOT / 'nbs/experiments/sweeps').glob('*.yaml'))
        assert {p.stem for p in specs} >= {'losses', 'readouts', 'clusters', 'local_crops', 'zeroshot'}
        for p in specs:
            sw = load_spec(p.relative_to(ROOT))
            assert expand(sw) and '# Budget on 2 cores' in p.read_text(), p.name
        losses = {r.setting for r in expand(load_spec('nbs/experiments/sweeps/losses.yaml'))}
        assert losses == {'cross', 'cross+vision', 'cross+cluster', 'paper', 'demo', 'demo_no_nouns', 'demo_no_bank',
                          'demo_no_value', 'demo_no_detach'}
        assert len(load_spec('nbs/experiments/sweeps/losses.yaml').seeds) >= 3
    finally: os.chdir(cwd)


def test_failures_recorded_jobs_2_skip_finished_and_table(tmp_path, nb):
    flag = tmp_path / 'broken'; flag.touch()
    spec = write_spec(tmp_path, f"""notebook: {nb}
fixed: {{fail_x: 3, flag: {flag}, sleep: 1.0}}
grid: {{x: [1, 2, 3]}}
seeds: [0, 1]
collect: [score, omp, nested.a]
""")
    out = tmp_path / 'runs'
    r = run_sweep(spec, out=out, jobs=2, progress=False)
    root = out / 'sw'
    assert sorted(r['failed']) == ['x=3-s0', 'x=3-s1']
    for name in ('x=3-s0', 'x=3-s1'):            # recorded: status, error, the executed notebook showing the error
        st = json.loads((root / name / 'status.json').read_text())
        assert st['state'] == 'failed' and st['error'] == 'ValueError: boom at x 3' and st['returncode'] != 0
        assert (root / name / 'error.txt').read_text().startswith('ValueError: boom at x 3')
        assert 'boom at x 3' in (root / name / 'trivial.ipynb').read_text()
        assert not (root / name / 'metrics.json').exists()
    status = {n: json.loads((root / n / 'status.json').read_text()) for n in ('x=1-s0', 'x=1-s1', 'x=2-s0', 'x=2-s1')}
    assert all(s['state'] == 'done' for s in status.values())
    assert all(json.loads((root / n / 'metrics.json').read_text())['omp'] == 1 for n in status)   # one thread per run
    # --jobs 2: two runs were in flight at once (each sleeps 1 s)
    spans = sorted((time.mktime(time.strptime(s['started'], '%Y-%m-%dT%H:%M:%S')), time.mktime(time.strptime(s['finished'], '%Y-%m-%dT%H:%M:%S')))
                   for s in status.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans

    # the table: parameters as columns, n, mean and std over seeds computed here independently
    runs = pd.read_csv(root / 'runs.csv'); table = pd.read_csv(root / 'table.csv')
    assert list(runs.columns) == ['run', 'x', 'seed', 'state', 'seconds', 'score', 'omp', 'nested.a']
    assert list(table.columns) == ['x', 'n', 'score_mean', 'score_std', 'omp_mean', 'omp_std', 'nested.a_mean', 'nested.a_std']
    t = table.set_index('x')
    for x in (1, 2):
        scores = [10 * x + s for s in (0, 1)]
        assert t.loc[x, 'n'] == 2 and t.loc[x, 'score_mean'] == pytest.approx(statistics.mean(scores))
        assert t.loc[x, 'score_std'] == pytest.approx(statistics.stdev(scores))
        assert t.loc[x, 'nested.a_mean'] == pytest.approx(0.5)
    assert t.loc[3, 'n'] == 0 and pd.isna(t.loc[3, 'score_mean'])
    md = (root / 'table.md').read_text()
    assert '| 1 | 2 | 10.500 ± 0.707 |' in md and '| 3 | 0 | – |' in md

    # mended (the notebook's failure condition gone, the spec unchanged): a relaunch runs the two failed runs only
    flag.unlink()
    mtimes = {n: (root / n / 'metrics.json').stat().st_mtime for n in status}
    r = run_sweep(spec, out=out, jobs=2, progress=False)
    assert r['failed'] == [] and {n: (root / n / 'metrics.json').stat().st_mtime for n in status} == mtimes
    assert (root / 'x=3-s0.old-1' / 'error.txt').exists()          # the failed attempt moved aside, not overwritten
    t = r['table'].set_index('x')
    assert t.loc[3, 'n'] == 2 and t.loc[3, 'score_mean'] == pytest.approx(30.5)

    # a finished run is not silently taken for a run with other parameters
    spec.write_text(spec.read_text().replace('sleep: 1.0', 'sleep: 0.5'))
    with pytest.raises(SpecError, match='finished with sleep=1.0'): run_sweep(spec, out=out, progress=False)


def test_cli_kill_and_relaunch_finishes_only_what_is_missing(tmp_path, nb):
    "`vilseg sweep` in a subprocess, stopped by SIGTERM mid-run, relaunched: it runs only the unfinished runs."
    spec = write_spec(tmp_path, f'notebook: {nb}\nresume_param: resume\nfixed: {{sleep: 2.5}}\ngrid: {{x: [1, 2, 3]}}\n', 'kill.yaml')
    out = tmp_path / 'runs'; root = out / 'kill'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([*VILSEG, 'sweep', str(spec), '--out', str(out), '--progress', 'false'], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((root / 'x=1/metrics.json').exists() and (root / '.work/x=2.ipynb').exists()):
        assert time.time() - t0 < 240 and p.poll() is None, 'the first run never finished'
        time.sleep(0.2)
    time.sleep(1.0)                      # x=2 is sleeping inside its notebook
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and 'the same command runs the rest' in err
    assert json.loads((root / 'x=2/status.json').read_text())['state'] == 'interrupted'
    assert not (root / 'x=3').exists() and not (root / 'x=2/metrics.json').exists()
    done_at = (root / 'x=1/metrics.json').stat().st_mtime

    q = subprocess.run([*VILSEG, 'sweep', str(spec), '--out', str(out), '--jobs', '2', '--progress', 'false'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert q.returncode == 0, q.stderr
    assert '3 runs, 1 finished already, 2 to run, 2 at a time' in q.stdout and '| 3 | 1 | 30.000 |' in q.stdout
    assert (root / 'x=1/metrics.json').stat().st_mtime == done_at
    m2 = json.loads((root / 'x=2/metrics.json').read_text())
    assert m2['resumed'] == 1 and (root / 'x=2/attempt-1/status.json').exists()   # continued in place (resume_param)
    assert json.loads((root / 'x=3/metrics.json').read_text())['resumed'] == 0


def test_a_stopping_sweep_starts_no_queued_run(tmp_path, nb):
    "Once the sweep is stopping (SIGTERM, Ctrl-C), a run the executor had queued returns without creating anything."
    import vilseg.sweep as S
    sw = load_spec(write_spec(tmp_path, f'notebook: {nb}\ngrid: {{x: [1]}}\n'))
    S._STOP.set()
    try: st = S.run_one(sw, expand(sw)[0], tmp_path / 'runs')
    finally: S._STOP.clear()
    assert st == {'run': 'x=1', 'state': 'not started', 'seconds': 0.0} and not (tmp_path / 'runs').exists()


def test_cli_errors(tmp_path, nb):
    "A bad spec: exit 2 and one line naming the file and the key, nothing run; a failed run: exit 1, named."
    bad = write_spec(tmp_path, f'notebook: {nb}\ngrid: {{nope: [1]}}\n', 'bad.yaml')
    q = subprocess.run([*VILSEG, 'sweep', str(bad), '--out', str(tmp_path / 'runs')], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert q.returncode == 2 and q.stderr.strip().splitlines()[-1].startswith(f'vilseg sweep: error: {bad}: grid.nope:')
    assert not (tmp_path / 'runs').exists()
    flag = tmp_path / 'f'; flag.touch()
    failing = write_spec(tmp_path, f'notebook: {nb}\nfixed: {{fail_x: 1, flag: {flag}}}\n', 'failing.yaml')
    q = subprocess.run([*VILSEG, 'sweep', str(failing), '--out', str(tmp_path / 'runs'), '--progress', 'false'], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert q.returncode == 1 and '1 runs failed' in q.stderr and 'ValueError: boom at x 1' in q.stdout


def test_figures_notebook_tolerates_missing_sweeps(tmp_path):
    "`make figures` with no sweep run yet: every figure skipped with a note, the results chapter says what to run."
    import papermill as pm
    readme = tmp_path / 'README.md'
    readme.write_text('# front\n\n<!-- results: generated by make figures -->\n| stale | row | here |\n<!-- /results -->\n\ntail text\n')
    (tmp_path / 'demo').mkdir()
    (tmp_path / 'demo' / 'metrics.json').write_text(json.dumps({'val_miou': 0.3214, 'val_miou_dense_baseline': 0.3, 'patch_oracle_miou': 0.7,
                                                                 'val_miou_unrefined': 0.15, 'total_seconds': 600, 'images_per_s': 88.4,
                                                                 'step_images_per_s': 97.0, 'config': {'seed': 3}}))
    pm.execute_notebook(str(ROOT / 'nbs/experiments/figures.ipynb'), str(tmp_path / 'figures.ipynb'), cwd=str(tmp_path), kernel_name='python3',
                        progress_bar=False, parameters=dict(runs_dir=str(tmp_path / 'runs'), fig_dir=str(tmp_path / 'figs'),
                                                            results=str(tmp_path / 'results.md'), checkpoint=str(tmp_path / 'none.pt'),
                                                            readme='README.md', demo_dir=str(tmp_path / 'demo')))
    text = (tmp_path / 'results.md').read_text()
    assert text.startswith('# Results') and 'not run yet: `vilseg sweep nbs/experiments/sweeps/losses.yaml`' in text
    assert 'zeroshot.yaml' in text and not list((tmp_path / 'figs').glob('*.png'))
    # the README's table: rewritten from the demo's metrics.json between the markers, the rest of the file kept
    r = readme.read_text()
    assert 'stale' not in r and r.startswith('# front\n') and r.endswith('<!-- /results -->\n\ntail text\n')
    assert '| ViL-Seg, `demo` recipe, seed 3 | **0.321** clusters / 0.300 dense read-out; patch oracle 0.700 |' in r
    assert '10.0 min; training at 88 images/s (the step alone 97)' in r and '0.150 clusters' in r
