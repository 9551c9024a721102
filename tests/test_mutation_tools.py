"""The mutation-testing driver's own rewrites (tests/mutants/run_mutants.py): decorated functions made visible to mutmut
without changing what they do, and mutants that change nothing but a docstring told apart from the rest."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests' / 'mutants'))
from run_mutants import undecorate, docstring_only, mutated_functions, mutant_diff, MODULES   # noqa: E402


def test_undecorate_writes_decorators_as_assignments_with_the_same_behaviour():
    code = '''
import contextlib, torch
from fastcore.basics import patch_to
class A:
    pass

@patch_to(A)
@torch.no_grad()
def twice(self, x):
    "Doubles."
    return x * 2

@contextlib.contextmanager
def ctx():
    yield 3

class B:
    @torch.no_grad()
    def f(self, x): return x + 1

@staticmethod
def kept(): return 1
'''
    out = undecorate(code)
    assert '@patch_to' not in out and '@torch.no_grad' not in out and '@contextlib' not in out
    assert 'twice = patch_to(A)(torch.no_grad()(twice))' in out and 'ctx = contextlib.contextmanager(ctx)' in out
    assert '    f = torch.no_grad()(f)' in out and '@staticmethod' in out          # only the listed decorators
    ns = {}
    exec(compile(out.replace('@staticmethod\n', ''), 'undecorated', 'exec'), ns)
    import torch
    x = torch.ones(2, requires_grad=True)
    y = ns['A']().twice(x)
    assert y.tolist() == [2.0, 2.0] and not y.requires_grad and ns['twice'].__doc__ == 'Doubles.'
    assert not ns['B']().f(x).requires_grad
    with ns['ctx']() as v: assert v == 3


def test_docstring_only_mutants_are_told_apart(tmp_path):
    f = tmp_path / 'm.py'
    f.write_text('''
def x_f__mutmut_orig(a, b=1):
    "Adds."
    return a + b
def x_f__mutmut_1(a, b=1):
    "XXAdds.XX"
    return a + b
def x_f__mutmut_2(a, b=1):
    "Adds."
    return a - b
def x_f__mutmut_3(a, b=2):
    "Adds."
    return a + b
def x_f__mutmut_4(a, b=1):
    return a + b
def x_f__mutmut_5(a, b=1):
    "XXAdds.XX"
    return a * b
class C:
    def xǁCǁg__mutmut_orig(self):
        "G."
        return 1
    def xǁCǁg__mutmut_1(self):
        "g."
        return 1
    def xǁCǁg__mutmut_2(self):
        "G."
        return 2
''')
    keys = ['pkg.m.x_f__mutmut_1', 'pkg.m.x_f__mutmut_2', 'pkg.m.x_f__mutmut_3', 'pkg.m.x_f__mutmut_4', 'pkg.m.x_f__mutmut_5',
            'pkg.m.xǁCǁg__mutmut_1', 'pkg.m.xǁCǁg__mutmut_2', 'pkg.m.x_missing__mutmut_1']
    funcs = mutated_functions(f)
    assert docstring_only(funcs, keys) == ['pkg.m.x_f__mutmut_1', 'pkg.m.x_f__mutmut_4', 'pkg.m.xǁCǁg__mutmut_1']
    assert mutant_diff(funcs, 'pkg.m.x_f__mutmut_2').split('\n')[1:] == [' def f(a, b=1):', '     "Adds."', '-    return a + b', '+    return a - b']
    assert mutant_diff(funcs, 'pkg.m.xǁCǁg__mutmut_2').split('\n')[-2:] == ['-    return 1', '+    return 2']


def test_every_module_selection_names_existing_files_and_no_notebook_test():
    for name, spec in MODULES.items():
        assert (ROOT / spec['path']).is_file(), name
        files = [a for a in spec['tests'] if a.startswith('tests/')]
        assert files and all((ROOT / a).is_file() for a in files), name
        assert not any('test_notebooks' in a for a in spec['tests']), name


def test_every_hand_bug_names_one_place_of_the_package():
    "Each bug of tests/mutants/hand_bugs.py replaces text that occurs exactly once in its module (a stale entry would not run)."
    from hand_bugs import BUGS
    for name, (mod, old, new, sel, *tf) in BUGS.items():
        assert (ROOT / 'vilseg' / mod).read_text().count(old) == 1, name
        assert old != new and (ROOT / 'tests' / (tf[0] if tf else 'test_wiring.py')).is_file(), name
