"""Plausible single-line bugs, each put into a copy of the package; the test selection that must fail.

    python tests/mutants/hand_bugs.py [--only ID ...]

Each bug is applied to a copy of vilseg/ in a temporary folder, which is put first on the import path (pytest runs
with that folder as its working directory), and `tests/test_wiring.py -k SELECTION` (or the file the bug names) is run against it: a bug is
caught when the selection fails. The unmutated copy must pass the same selections. Not part of `make test`."""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / 'tests' / 'test_wiring.py'

# id: (module, old text, new text, -k selection[, test file])
RECIPE_2P = ('recipe_gradients and demo', 'test_ddp_exact.py')          # the demo recipe's 2-process gradient test
DISTILL = "out['bank_distill'] = bank_distill_loss(pe, be, scale, {})"
WARN = "'open_clip tag or a weights file)', UserWarning{})"
BUGS = {
    'slide-overwrite': ('evaluate.py', 'out[..., y:y + wh, x:x + ww] += s', 'out[..., y:y + wh, x:x + ww] = s', 'slide or sliding'),
    'slide-count': ('evaluate.py', 'cnt[..., y:y + wh, x:x + ww] += 1', 'cnt[..., y:y + wh, x:x + ww] = 1', 'slide or sliding'),
    'slide-last-x': ('evaluate.py', 'xs.append(W - ww)', 'xs.append(W - stride)', 'slide or sliding'),
    'slide-last-y': ('evaluate.py', 'if ys[-1] + wh < H: ys.append(H - wh)', 'if ys[-1] + wh < H: ys.append(H - stride)', 'slide or sliding'),
    'slide-ww-typo': ('evaluate.py', 'wh, ww = min(window, H), min(window, W)', 'wh, ww = min(window, H), min(window, H)', 'slide or sliding'),
    'slide-stride-range': ('evaluate.py', 'ys = list(range(0, max(H - wh, 0) + 1, stride))', 'ys = list(range(0, max(H - wh, 0) + 1, window))', 'slide or sliding'),
    'eval-fg-index': ('evaluate.py', 'pred = fg_idx.to(s.device)[arg]', 'pred = arg', 'sliding or calibrate or seen'),
    'eval-threshold-le': ('evaluate.py', 'torch.where(best < t,', 'torch.where(best > t,', 'sliding or calibrate or seen'),
    'eval-prob-dim': ('evaluate.py', "if bg_score == 'prob': s = (scale * s).softmax(0)", "if bg_score == 'prob': s = (scale * s).softmax(-1)", 'calibrate'),
    'eval-prob-scale': ('evaluate.py', "scale = float(prob_scale) if prob_scale is not None else float(model.clip.logit_scale.exp()) if bg_score == 'prob' else 1.0",
                        "scale = float(model.clip.logit_scale.exp()) if bg_score == 'prob' else 1.0", 'calibrate'),
    'eval-seen-dropped': ('evaluate.py', 'cms = {t: ConfusionMatrix(C, seen=seen, unseen=unseen) for t in ths}', 'cms = {t: ConfusionMatrix(C) for t in ths}', 'seen'),
    'eval-result-key': ('evaluate.py', 'res = cms[key].compute()', 'res = cms[ths[0]].compute()', 'sliding or seen'),
    'calib-min': ('evaluate.py', "best = max(r['sweep'], key=r['sweep'].get)", "best = min(r['sweep'], key=r['sweep'].get)", 'calibrate'),
    'protocol-seen-swap': ('protocols.py', 'seen=seen, unseen=unseen, resize=', 'seen=unseen, unseen=seen, resize=', 'seen'),
    'protocol-threshold': ('protocols.py', 'bg_index=bg, bg_threshold=p.bg_threshold,', 'bg_index=bg, bg_threshold=0.0,', 'seen'),
    'cm-allreduce-max': ('metrics.py', 'dist.all_reduce(buf, op=dist.ReduceOp.SUM)', 'dist.all_reduce(buf, op=dist.ReduceOp.MAX)', 'confusion'),
    'cm-allreduce-invalid': ('metrics.py', 'self.mat.copy_(buf[:C * C].view(C, C)); self.invalid.copy_(buf[C * C:])', 'self.mat.copy_(buf[:C * C].view(C, C))', 'confusion'),
    'cm-allreduce-noop': ('metrics.py', 'if not (dist.is_available() and dist.is_initialized()): return self', 'return self', 'confusion'),
    'atomic-except': ('core.py', '    except BaseException:\n        if os.path.exists(tmp)', '    except Exception:\n        if os.path.exists(tmp)', 'atomic'),
    'atomic-no-unlink': ('core.py', 'if os.path.exists(tmp): os.unlink(tmp)', 'pass', 'atomic'),
    'atomic-in-place': ('core.py', "fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')",
                        "tmp = str(path); fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)", 'atomic'),
    'rng-numpy': ('core.py', "random.setstate(st['python']); np.random.set_state(st['numpy']); torch.set_rng_state(st['torch'])",
                  "random.setstate(st['python']); torch.set_rng_state(st['torch'])", 'rng'),
    'rng-python': ('core.py', "st = dict(python=random.getstate(), numpy", "st = dict(python=random.Random(0).getstate(), numpy", 'rng'),
    'vision-no-detach': ('losses.py', 'tg = gather_nograd(target.detach())', 'tg = gather_nograd(target)', 'vision'),
    'vision-labels': ('losses.py', 'labels = (torch.arange(B, device=local.device) + rank * B).repeat_interleave(m)',
                      'labels = (torch.arange(B, device=local.device) + rank * B).repeat(m)', 'vision'),
    'vision-temperature': ('losses.py', 'logits = local.reshape(B * m, D) @ tg.T / temperature', 'logits = local.reshape(B * m, D) @ tg.T', 'vision'),
    'forward-vision-student-target': ('vilseg.py', 'if self.teacher is not None:\n            with torch.no_grad(): tgt',
                                      'if False:\n            with torch.no_grad(): tgt', 'ema'),
    'ema-swapped': ('vilseg.py', 'pt.mul_(m).add_(ps.detach(), alpha=1 - m)', 'pt.mul_(1 - m).add_(ps.detach(), alpha=m)', 'ema or skipped'),
    'ema-not-called': ('train.py', '        _unwrap(ddp).update_teacher()\n', '\n', 'skipped'),
    'align-flip-axis': ('views.py', 'out.flip(-1), out)', 'out.flip(-2), out)', 'cluster_loss or multiview'),
    'align-batch-index': ('views.py', 'torch.cat([torch.arange(B, dtype=maps.dtype', 'torch.cat([torch.zeros(B, dtype=maps.dtype', 'cluster_loss'),
    'align-box-scale': ('views.py', 'torch.tensor([w, h, w, h]', 'torch.tensor([h, w, h, w]', 'cluster_loss or multiview'),
    'views-box-order': ('views.py', "torch.tensor([pj / G, pi / G, (pj + pw) / G, (pi + ph) / G])", "torch.tensor([pi / G, pj / G, (pi + ph) / G, (pj + pw) / G])", 'multiview'),
    'views-flip-flag': ('views.py', "out['pair_flip'] = torch.tensor(flip)", "out['pair_flip'] = torch.tensor(False)", 'multiview'),
    'cluster-flip-ignored': ('vilseg.py', 'q1 = align_to_pair(q1, pair_box, pair_flip, q1.shape[-2:])', 'q1 = align_to_pair(q1, pair_box, torch.zeros_like(pair_flip), q1.shape[-2:])', 'cluster_loss'),
    'train-skip-count-batches': ('train.py', "skipped += int(batch.pop('n_skipped', 0))", "skipped += int(batch.pop('n_skipped', 0) > 0)", 'skipped'),
    'collate-all-bad-lost': ('captions.py', 'if not good: return dict(n_skipped=n_skipped)', 'if not good: return {}', 'skipped'),
    'train-skip-no-sched': ('train.py', 'step += 1; sched.step(); bar.update(1); continue', 'step += 1; bar.update(1); continue', 'skipped'),
    'train-skip-threshold': ('train.py', 'if _trim_to_common_batch(batch, ws) < 2:', 'if _trim_to_common_batch(batch, ws) < 1:', 'skipped'),
    # the cross-modal loss without the gradient through the other ranks' embeddings: the same values, other gradients
    # (mutmut's x_cross_modal_loss #12, #17, #23, which its in-process runner cannot reach: the test spawns 2 gloo processes)
    'ddp-gather-grad-none': ('losses.py', 'gather_with_grad=ws > 1', 'gather_with_grad=None', *RECIPE_2P),
    'ddp-gather-grad-default': ('losses.py', 'gather_with_grad=ws > 1, ', '', *RECIPE_2P),
    'ddp-gather-grad-ws2': ('losses.py', 'gather_with_grad=ws > 1', 'gather_with_grad=ws > 2', *RECIPE_2P),
    # the noun bank's distillation without its words: each rank distills its own nouns, not the distinct nouns of all
    # ranks (mutmut's x_forward #222, #226: at one process gather_prompts returns its input, so only 2 processes show it)
    'ddp-bank-distill-words-none': ('vilseg.py', DISTILL.format('words'), DISTILL.format('None'), *RECIPE_2P),
    'ddp-bank-distill-words-default': ('vilseg.py', DISTILL.format('words'), DISTILL.format(''), *RECIPE_2P),
    # computed at import (the template sets) or seen from the caller's frame (the warning): mutmut's trampolines cannot show
    # them (x__format_strings #3, #4; x_clip_baseline #12, #15)
    'templates-format-none': ('protocols.py', "return [f('{}') for f in fns]", 'return [f(None) for f in fns]', 'template_sets', 'test_mutants_kill.py'),
    'templates-format-marked': ('protocols.py', "return [f('{}') for f in fns]", "return [f('XX{}XX') for f in fns]", 'template_sets', 'test_mutants_kill.py'),
    'warning-stacklevel-1': ('protocols.py', WARN.format(', stacklevel=2'), WARN.format(''), 'warning_names', 'test_protocols.py'),
    'warning-stacklevel-3': ('protocols.py', WARN.format(', stacklevel=2'), WARN.format(', stacklevel=3'), 'warning_names', 'test_protocols.py'),
}


def run(sel, pkg_parent, tests=TESTS, timeout=900):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TQDM_DISABLE': '1', 'PYTHONDONTWRITEBYTECODE': '1'}
    t = time.time()
    r = subprocess.run([sys.executable, '-m', 'pytest', str(tests), '-q', '-x', '-p', 'no:cacheprovider', '-k', sel],
                       cwd=pkg_parent, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, time.time() - t, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]


def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--only', nargs='*'); a = ap.parse_args()
    ids = a.only or list(BUGS)
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / 'base'; shutil.copytree(ROOT / 'vilseg', base / 'vilseg', ignore=shutil.ignore_patterns('__pycache__'))
        sels = sorted({(BUGS[i][3], BUGS[i][4] if len(BUGS[i]) > 4 else TESTS.name) for i in ids})
        for sel, tf in sels:
            rc, secs, last = run(sel, base, TESTS.parent / tf)
            print(f'baseline  -k {sel!r}: rc={rc} ({secs:.0f} s) {last}', flush=True)
            if rc != 0: sys.exit('the unmutated package fails its selection: fix the tests first')
        caught = 0
        for i in ids:
            mod, old, new, sel, *tf = BUGS[i]
            work = Path(d) / i; shutil.copytree(base, work)
            f = work / 'vilseg' / mod; src = f.read_text()
            if src.count(old) != 1: sys.exit(f'{i}: {old!r} occurs {src.count(old)} times in {mod}')
            f.write_text(src.replace(old, new))
            rc, secs, last = run(sel, work, TESTS.parent / (tf[0] if tf else TESTS.name))
            caught += rc != 0
            print(f"{'CAUGHT ' if rc else 'MISSED '} {i:32s} {mod:12s} -k {sel!r:40s} ({secs:.0f} s) {last}", flush=True)
            shutil.rmtree(work)
        print(f'{caught} of {len(ids)} bugs caught')


if __name__ == '__main__':
    main()
