"""`mutmut` with two shims for mutmut 3.3.1, run by tests/mutants/run_mutants.py as `python mutmut_launch.py run ...`.

- mutmut records test ids from pytest's `item._nodeid`, which pytest 9 no longer has (`item.nodeid` is the same string).
- mutmut estimates each test's duration from its last report (the teardown, about 0 s), so every mutant gets the
  floor of its wall-clock limit, 15 s; on a shared, niced machine that turns slow runs into false timeouts. Here the
  limit is at least `MUTMUT_WALL_FLOOR` seconds (default 120).
- mutmut's trampoline (the function that dispatches to the original or a mutant) has no docstring, so code that reads
  a function's `__doc__` (the protocols' cards, `protocol_cards()`) sees None. Each trampoline gets the original's
  docstring (a mutant of that docstring itself is then not visible through `__doc__`).
mutmut.__main__ is imported as a module (not run as `python -m mutmut`): the trampolines in the mutated code import
it, and a second copy would fail on its `set_start_method('fork')`."""
import os, signal
from datetime import datetime
from time import sleep

import _pytest.nodes
_pytest.nodes.Node._nodeid = property(lambda self: self.nodeid)

import mutmut.__main__ as mm
import mutmut.file_mutation as fm
from mutmut.trampoline_templates import build_trampoline, mangle_function_name

def build_trampoline_with_doc(*, orig_name, mutants, class_name):
    mangled = mangle_function_name(name=orig_name, class_name=class_name)
    return (build_trampoline(orig_name=orig_name, mutants=mutants, class_name=class_name)
            + f'{orig_name}.__doc__ = {mangled}__mutmut_orig.__doc__\n')

fm.build_trampoline = build_trampoline_with_doc

FLOOR = float(os.environ.get('MUTMUT_WALL_FLOOR', 120))


def timeout_checker(mutants):
    def inner():
        while True:
            sleep(1)
            now = datetime.now()
            for m, mutant_name, result in mutants:
                with mm.START_TIMES_BY_PID_LOCK:
                    start_times_by_pid = dict(m.start_time_by_pid)
                for pid, start_time in start_times_by_pid.items():
                    limit = max(FLOOR, (m.estimated_time_of_tests_by_mutant[mutant_name] + 1) * 15)
                    if (now - start_time).total_seconds() > limit:
                        try: os.kill(pid, signal.SIGXCPU)
                        except ProcessLookupError: pass
    return inner


mm.timeout_checker = timeout_checker

if __name__ == '__main__':
    mm.cli()
