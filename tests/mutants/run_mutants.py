"""Mutation testing of the modules whose silent errors change reported numbers: mutmut 3 over a copy of the package.

    python tests/mutants/run_mutants.py [MODULE ...] [--minutes N] [--jobs J] [--resume]      (what `make mutants` runs)

MODULE is a key of `MODULES` (default: all, smallest first). For each one, a work folder runs/mutants/work/MODULE gets a
copy of vilseg/ and tests/ and a pyproject.toml for mutmut that mutates only that module's file, with that module's
test selection (`tests` below) as mutmut's `tests_dir`. mutmut then copies the work folder's package into its own
`mutants/` and runs there: the real package and the repository's tests are never touched or imported.
mutmut 3 first runs the selection once to learn which test calls which function, then runs each mutant (in a forked
process, so torch is imported once) against only the tests that call the mutated function.

Two adjustments to mutmut's assumptions, both made in the work folder's copy only:
- mutmut 3 leaves decorated functions alone; here `@torch.no_grad()`, `@patch_to(...)`, `@dataclass` and
  `@contextlib.contextmanager` are rewritten as assignments after the definition (`f = torch.no_grad()(f)`, the same
  function object in the end), so `evaluate`, `slide_scores`, `ConfusionMatrix.update` and the model's read-out
  (`ViLSeg.scores` etc., added to the class with `patch_to`) are mutated too.
- The selections never include tests/test_notebooks.py: its export/clean-consistency check would kill every mutant
  for the wrong reason (the mutated module no longer matches its notebook), and running notebooks is slow.

Each module's run is bounded by --minutes (wall clock); what finished by then is reported, the rest as `not checked`.
Writes runs/mutants/MODULE.json and runs/mutants/report.md + report.json (per module: killed / survived / timeout /
no tests / not checked and the score, and each survivor's diff)."""
import argparse, fnmatch, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / 'runs' / 'mutants'

# Tests that spawn processes (gloo groups, torchrun, CLI subprocesses) are left out: mutmut only sees the functions a test
# calls in its own process, so they could not kill a mutant through its per-function selection, and they are slow.
# ConfusionMatrix.all_reduce is covered by test_wiring's 2-process test and tests/mutants/hand_bugs.py instead.
# module: the file to mutate, optional function globs (mutmut names: `vilseg.vilseg.x_scores__mutmut_3`), the test
# selection (pytest arguments; `-k` terms name the test file so that one expression can select from several files).
MODULES = {
    'metrics': dict(path='vilseg/metrics.py',
                    tests=['tests/test_metrics.py', 'tests/test_wiring.py', 'tests/test_mutants_kill.py',
                           '-k', 'test_metrics.py or (test_wiring.py and seen_unseen_hand) or (test_mutants_kill.py and metrics)']),
    'evaluate': dict(path='vilseg/evaluate.py',
                     tests=['tests/test_wiring.py', 'tests/test_mutants_kill.py', 'tests/test_speed_paths.py',
                            '-k', '(test_wiring.py and (slide or sliding or calibrate or seen)) or (test_mutants_kill.py and evaluate) '
                                  'or (test_speed_paths.py and sliding)']),
    'clustering': dict(path='vilseg/clustering.py',
                       tests=['tests/test_wiring.py', 'tests/test_ddp_exact.py', 'tests/test_vilseg.py', 'tests/test_mutants_kill.py',
                              'tests/test_speed_paths.py',
                              '-k', '(test_wiring.py and (cluster_loss or sliding or seen_unseen_hand)) or (test_ddp_exact.py and pamr) '
                                    'or (test_vilseg.py and segment_odd) or (test_mutants_kill.py and clustering) or test_speed_paths.py']),
    # the DDP tests of the losses (test_ddp_exact noun/iic, test_vilseg two_process_*) spawn processes, which mutmut's
    # forked runner cannot start: the selection is the single-process tests that call the losses
    'losses': dict(path='vilseg/losses.py',
                   tests=['tests/test_losses_formulas.py', 'tests/test_wiring.py', 'tests/test_ddp_exact.py', 'tests/test_mutants_kill.py',
                          '-k', 'test_losses_formulas.py or (test_wiring.py and (vision or cluster_loss)) or (test_ddp_exact.py and batchnorm) '
                                'or (test_mutants_kill.py and losses)']),
    'readout': dict(path='vilseg/vilseg.py',
                    functions=['vilseg.vilseg.x_class_embeddings__mutmut_*', 'vilseg.vilseg.x_scores__mutmut_*',
                               'vilseg.vilseg.x_segment__mutmut_*', 'vilseg.vilseg.x__cluster_logits__mutmut_*',
                               'vilseg.vilseg.x_clusters__mutmut_*', 'vilseg.vilseg.x__as_names__mutmut_*'],
                    tests=['tests/test_wiring.py', 'tests/test_vilseg.py', 'tests/test_mutants_kill.py', 'tests/test_text_cache.py',
                           '-k', '(test_wiring.py and (slide or sliding or calibrate or seen)) or (test_vilseg.py and segment_odd) '
                                 'or (test_mutants_kill.py and readout) or (test_text_cache.py and cached_on_disk)']),
    # the model's training forward (vilseg/vilseg.py outside the read-out): every loss term, weight and gradient against the
    # loss written out by hand, the EMA teacher, the stop-gradients and BatchNorm's statistics under the views' forwards
    'model': dict(path='vilseg/vilseg.py',
                  functions=['vilseg.vilseg.x_forward__mutmut_*', 'vilseg.vilseg.x__view_stats__mutmut_*',
                             'vilseg.vilseg.x_cluster_loss__mutmut_*', 'vilseg.vilseg.x__teacher_global__mutmut_*',
                             'vilseg.vilseg.x_update_teacher__mutmut_*', 'vilseg.vilseg.x_frozen_bn_stats__mutmut_*'],
                  tests=['tests/test_wiring.py', 'tests/test_ddp_exact.py', 'tests/test_mutants_kill.py',
                         '-k', '(test_wiring.py and (vision or ema or cluster_loss)) or (test_ddp_exact.py and batchnorm) '
                               'or (test_mutants_kill.py and model_forward)']),
    # evaluate_run, load_model, clip_baseline and the reference decision rules in-process (test_mutants_kill.py protocols):
    # the command-line tests that also run them start subprocesses; the presets through the colour oracle (a micro model
    # on every preset, test_preset_runs_micro_model_and_writes_results, takes 25 s a mutant and checks ranges only)
    'protocols': dict(path='vilseg/protocols.py',
                      tests=['tests/test_protocols.py', 'tests/test_wiring.py', 'tests/test_references.py', 'tests/test_mutants_kill.py',
                             '-k', '(test_protocols.py and (preset_harness or errors) and not cli) or (test_wiring.py and run_protocol) '
                                   'or (test_references.py and (sclip_background_rule or variants_match)) '
                                   'or (test_mutants_kill.py and protocols)']),
    # the zero-shot tests of tests/test_zeroshot.py train decoders end to end (seconds per mutant, and their DDP test spawns
    # processes mutmut cannot see into); the selection is the hand-computed expectations of tests/test_mutants_kill.py
    'proposals': dict(path='vilseg/proposals.py',
                      tests=['tests/test_mutants_kill.py', '-k', 'proposals']),
    # the zero-shot module's functions behind its reported numbers (pseudo labels, the ensemble, the evaluation); its
    # training loop and I/O are left to the tests that run it end to end
    'zeroshot': dict(path='vilseg/zeroshot.py',
                     functions=['vilseg.zeroshot.x_pseudo_assign__mutmut_*', 'vilseg.zeroshot.x_ensemble_probs__mutmut_*',
                                'vilseg.zeroshot.x_zeroshot_scores__mutmut_*', 'vilseg.zeroshot.x_evaluate_zeroshot__mutmut_*',
                                'vilseg.zeroshot.x_pseudo_quality__mutmut_*', 'vilseg.zeroshot.x__fixed_size__mutmut_*'],
                     tests=['tests/test_mutants_kill.py', '-k', 'zeroshot']),
}
KILL_TESTS = 'tests/test_mutants_kill.py'
LAUNCH = Path(__file__).with_name('mutmut_launch.py')   # mutmut's command line with shims for mutmut 3.3.1 under pytest 9
DECORATORS = ('torch.no_grad', 'patch_to', 'patch', 'dataclass', 'contextlib.contextmanager')


def undecorate(code: str) -> str:
    "Decorators of `DECORATORS` as assignments after the definition: `@a @b def f` -> `def f` + `f = a(b(f))`."
    import libcst as cst

    def name_of(d):
        e = d.decorator.func if isinstance(d.decorator, cst.Call) else d.decorator
        return cst.Module([]).code_for_node(e)

    def rewrite(body):
        out = []
        for st in body:
            if isinstance(st, (cst.FunctionDef, cst.ClassDef)) and st.decorators and all(name_of(d) in DECORATORS for d in st.decorators):
                expr = st.name.value
                for d in reversed(st.decorators): expr = f'{cst.Module([]).code_for_node(d.decorator)}({expr})'
                lead = list(st.decorators[0].leading_lines) + list(st.leading_lines)
                st = st.with_changes(decorators=[], leading_lines=lead)
                if isinstance(st, cst.ClassDef): st = st.with_changes(body=st.body.with_changes(body=rewrite(st.body.body)))
                out += [st, cst.parse_statement(f'{st.name.value} = {expr}\n')]
            elif isinstance(st, cst.ClassDef) and isinstance(st.body, cst.IndentedBlock):
                out.append(st.with_changes(body=st.body.with_changes(body=rewrite(st.body.body))))
            else:
                out.append(st)
        return out

    m = cst.parse_module(code)
    return m.with_changes(body=rewrite(m.body)).code


def selection(spec: dict, before: bool) -> list:
    "The module's pytest arguments; with `before`, without tests/test_mutants_kill.py (the tests written from survivors)."
    return [a for a in spec['tests'] if not (before and a == KILL_TESTS)]


def prepare(name: str, spec: dict, resume: bool, before: bool = False) -> Path:
    work = OUT / 'work' / name
    if work.exists() and not resume: shutil.rmtree(work)
    if resume and (work / 'mutants').exists(): return work
    work.mkdir(parents=True, exist_ok=True)
    ign = shutil.ignore_patterns('__pycache__', '*.pyc', 'mutants')
    shutil.copytree(ROOT / 'vilseg', work / 'vilseg', ignore=ign)
    shutil.copytree(ROOT / 'tests', work / 'tests', ignore=ign)
    if before: (work / KILL_TESTS).unlink()
    target = work / spec['path']
    target.write_text(undecorate(target.read_text()))
    others = sorted(str(p.relative_to(work)) for p in (work / 'vilseg').glob('*.py') if p != target)
    toml = ['[tool.mutmut]', f'paths_to_mutate = [{json.dumps(spec["path"].rsplit("/", 1)[0] + "/")}]',
            f'do_not_mutate = {json.dumps(others)}', f'tests_dir = {json.dumps(selection(spec, before))}']
    (work / 'pyproject.toml').write_text('\n'.join(toml) + '\n')
    return work


def run_module(name: str, spec: dict, minutes: float, resume: bool, before: bool = False) -> dict:
    tag = name + ('-before' if before else '')
    work = prepare(tag, spec, resume, before)
    # --tb=line: a failing test's report shows no source, so pytest does not parse the mutated module (mutmut writes every
    # mutant into it: zeroshot.py holds 2867) to find the failing statement, which took seconds per killed mutant
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'TQDM_DISABLE': '1', 'MPLBACKEND': 'Agg',
           'PYTEST_ADDOPTS': (os.environ.get('PYTEST_ADDOPTS', '') + ' --tb=line').strip(),
           'PYTHONPATH': str(work / 'mutants')}   # the mutated copy, ahead of the editable install of the real package
    (work / 'mutants').mkdir(exist_ok=True)   # before python starts: a PYTHONPATH folder missing then is never searched
    cmd = [sys.executable, str(LAUNCH), 'run', '--max-children', '1', *spec.get('functions', [])]
    t0 = time.time(); log = open(OUT / f'{tag}.log', 'w')
    p = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = p.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM); time.sleep(3)
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        p.wait(); rc = 'budget'
    log.close()
    res = collect(tag, spec, work)
    res.update(rc=rc, minutes=round((time.time() - t0) / 60, 1), tests=selection(spec, before))
    (OUT / f'{tag}.json').write_text(json.dumps(res, indent=1))
    return res


NOT_SCORED = ('not checked', 'skipped', 'docstring')


def mutated_functions(mutated: Path) -> dict:
    "Every function of mutmut's mutated module (originals `*__mutmut_orig`, mutants `*__mutmut_N`): name -> (ast node, source)."
    import ast, textwrap
    text = mutated.read_text(); lines = text.splitlines()
    return {n.name: (n, textwrap.dedent('\n'.join(lines[n.lineno - 1:n.end_lineno])))
            for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def docstring_only(funcs: dict, keys) -> list:
    """The mutants that change nothing but a docstring (their function's AST equals the original's once docstrings are
    dropped): they change `__doc__` only, and mutmut's trampoline shows the original's docstring anyway. mutmut 2 did not
    generate them; here they are counted apart and not scored."""
    import ast
    def bare(f):
        body = f.body[1:] if f.body and isinstance(f.body[0], ast.Expr) and isinstance(getattr(f.body[0], 'value', None), ast.Constant) \
            and isinstance(f.body[0].value.value, str) else f.body
        return ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(f.args)
    out, cache = [], {}
    for k in keys:
        name = k.rsplit('.', 1)[-1]
        oname = name.rsplit('__mutmut_', 1)[0] + '__mutmut_orig'
        if name not in funcs or oname not in funcs: continue
        if oname not in cache: cache[oname] = bare(funcs[oname][0])
        if bare(funcs[name][0]) == cache[oname]: out.append(k)
    return out


def mutant_diff(funcs: dict, key: str) -> str:
    "The unified diff of a mutant against its original (both named as the function they replace)."
    import difflib, re
    name = key.rsplit('.', 1)[-1]; base = name.rsplit('__mutmut_', 1)[0]
    shown = re.sub(r'^x_|^xǁ[^ǁ]+ǁ', '', base)
    a = funcs[base + '__mutmut_orig'][1].replace(base + '__mutmut_orig', shown, 1).split('\n')
    b = funcs[name][1].replace(name, shown, 1).split('\n')
    return '\n'.join(list(difflib.unified_diff(a, b, lineterm=''))[2:])


def collect(name: str, spec: dict, work: Path) -> dict:
    "Counts (exit codes read with mutmut's own table from its meta file in the work folder) and each survivor's diff."
    meta = work / 'mutants' / (spec['path'] + '.meta')
    if not meta.exists(): return dict(module=name, error=f'no results (see runs/mutants/{name}.log)')
    codes = json.loads(meta.read_text())['exit_code_by_key']
    globs = spec.get('functions')
    if globs: codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, g) for g in globs)}
    from mutmut.__main__ import status_by_exit_code
    status = {k: status_by_exit_code.get(v, f'exit {v}') for k, v in codes.items()}
    funcs = mutated_functions(work / 'mutants' / spec['path'])    # Python's ast: libcst takes minutes and GBs on a module of 2,000+ mutants
    for k in docstring_only(funcs, status): status[k] = 'docstring'
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    checked = sum(n for s, n in counts.items() if s not in NOT_SCORED)
    killed = counts.get('killed', 0) + counts.get('timeout', 0) + counts.get('segfault', 0)   # a crashed test run caught the mutant
    survivors = sorted(k for k, s in status.items() if s in ('survived', 'no tests'))
    diffs = {}
    for k in survivors:
        try: diffs[k] = mutant_diff(funcs, k)
        except Exception as e: diffs[k] = f'(no diff: {e!r})'
    return dict(module=name, path=spec['path'], functions=globs, tests=spec['tests'], counts=counts, total=len(status),
                checked=checked, score=round(killed / checked, 3) if checked else None,
                survivors={k: dict(status=status[k], diff=diffs[k]) for k in survivors})


def report(names):
    rows, allres = [], {}
    for n in names:
        f = OUT / f'{n}.json'
        if not f.exists(): continue
        r = json.loads(f.read_text()); allres[n] = r
        if 'error' in r: rows.append(f'| {n} | {r["error"]} |||||||'); continue
        c = r['counts']
        checked = sum(v for k, v in c.items() if k not in NOT_SCORED)
        caught = c.get('killed', 0) + c.get('timeout', 0) + c.get('segfault', 0)
        rows.append(f"| {n} | {c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('segfault', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
                    f"{c.get('docstring', 0)} | {c.get('not checked', 0)} | {r['total']} | {format(caught / checked, '.1%') if checked else '-'} | {r.get('minutes', '')} |")
    md = ['# Mutation score (mutmut 3; score = (killed + timeout + segfault) / checked; checked = all but docstring-only and '
          'not-checked mutants; `no tests` counted as not killed)', '',
          '| module | killed | timeout | segfault | survived | no tests | docstring | not checked | total | score | minutes |',
          '|---|---|---|---|---|---|---|---|---|---|---|', *rows, '']
    for n, r in allres.items():
        for k, s in r.get('survivors', {}).items():
            md += [f'## {n}: {k} ({s["status"]})', '', '```diff', s['diff'].strip(), '```', '']
    (OUT / 'report.md').write_text('\n'.join(md))
    (OUT / 'report.json').write_text(json.dumps(allres, indent=1))
    print('\n'.join(md[:4 + len(rows)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('modules', nargs='*', default=list(MODULES), help=f'of {list(MODULES)}')
    ap.add_argument('--minutes', type=float, default=30, help='wall-clock budget per module')
    ap.add_argument('--jobs', type=int, default=1, help='modules run at once (one thread each)')
    ap.add_argument('--resume', action='store_true', help="keep the work folder: mutmut skips mutants it has results for")
    ap.add_argument('--before', action='store_true', help=f'without {KILL_TESTS}: the score the older tests give')
    ap.add_argument('--report-only', action='store_true')
    a = ap.parse_args()
    bad = [m for m in a.modules if m not in MODULES]
    if bad: sys.exit(f'unknown modules {bad}; known: {list(MODULES)}')
    OUT.mkdir(parents=True, exist_ok=True)
    for n in a.modules if a.report_only else []:              # results of earlier runs, collected again
        tag = n + ('-before' if a.before else '')
        if (OUT / 'work' / tag / 'mutants').exists():
            old = json.loads((OUT / f'{tag}.json').read_text()) if (OUT / f'{tag}.json').exists() else {}
            r = collect(tag, MODULES[n], OUT / 'work' / tag)
            r.update({k: old[k] for k in ('rc', 'minutes', 'tests') if k in old})
            (OUT / f'{tag}.json').write_text(json.dumps(r, indent=1))
    def one(n):
        print(f'== {n}: mutmut over {MODULES[n]["path"]} (budget {a.minutes:g} min)', flush=True)
        r = run_module(n, MODULES[n], a.minutes, a.resume, a.before)
        print(f'== {n}: {r.get("counts", r.get("error"))} score {r.get("score")} in {r["minutes"]} min (rc {r["rc"]})', flush=True)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:           # each module is its own mutmut process
        list(ex.map(one, a.modules if not a.report_only else []))
    report([t for n in MODULES for t in (n + '-before', n) if (OUT / f'{t}.json').exists()])


if __name__ == '__main__':
    main()
