"""Speed of the zero-shot decoder's training step on the world's shapes (64-px images, 8x8 patch grid, 128-d features),
split into the Hungarian matching and the rest, and of its semantic inference; medians over timed iterations after a
warm-up, in one process. Usage: python bench/bench_zeroshot.py [--threads 2] [--iters 10]"""
import argparse, time
import torch, torch.nn.functional as F
from vilseg.proposals import MaskProposalDecoder, ProposalConfig, ProposalCriterion, LossConfig, text_relations, semantic_scores
import vilseg.proposals as P

ap = argparse.ArgumentParser(); ap.add_argument('--threads', type=int, default=2); ap.add_argument('--iters', type=int, default=10)
a = ap.parse_args(); torch.set_num_threads(a.threads)
g = torch.Generator().manual_seed(0)
t = F.normalize(torch.randn(13, 128, generator=g), dim=-1); R = text_relations(t)
match_s = []
_hm = P.hungarian_match
def timed_match(*args, **kw):
    t0 = time.perf_counter(); r = _hm(*args, **kw); match_s[-1] += time.perf_counter() - t0; return r
P.hungarian_match = timed_match
print(f'threads {a.threads}; median over {a.iters} iterations')
print('| batch | queries | step s | images/s | matching share | inference images/s |')
print('|---|---|---|---|---|---|')
for B, N in ((16, 16), (32, 16), (32, 32)):
    torch.manual_seed(0)
    dec = MaskProposalDecoder(128, 128, 8, ProposalConfig(n_queries=N, background=False))
    crit = ProposalCriterion(LossConfig(rank='pairwise'), background=False)
    opt = torch.optim.AdamW(dec.parameters(), 5e-4)
    f, x = torch.randn(B, 8, 8, 128, generator=g), torch.randn(B, 3, 64, 64, generator=g)
    lab = torch.randint(0, 13, (B, 1, 1), generator=g).expand(B, 64, 64).clone(); lab[:, 8:30, 8:30] = 3; lab[:, 36:60, 30:62] = 7
    steps = []
    for i in range(a.iters + 2):
        match_s.append(0.0); t0 = time.perf_counter()
        r = crit(dec(f, x, t), lab, R); opt.zero_grad(); r['loss'].backward(); opt.step()
        steps.append(time.perf_counter() - t0)
    steps, ms = steps[2:], match_s[2:]
    med = sorted(steps)[len(steps) // 2]; share = sorted(m / s for m, s in zip(ms, steps))[len(steps) // 2]
    dec.eval(); inf = []
    with torch.no_grad():
        for i in range(a.iters + 2):
            t0 = time.perf_counter(); semantic_scores(dec(f, x, t), False, size=(64, 64)).argmax(1); inf.append(time.perf_counter() - t0)
    im = sorted(inf[2:])[len(inf[2:]) // 2]
    print(f'| {B} | {N} | {med:.3f} | {B / med:.0f} | {share:.0%} | {B / im:.0f} |')
