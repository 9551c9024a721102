import os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Two pytest-xdist workers on two cores: one torch thread each avoids oversubscription.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('TQDM_DISABLE', '1')
# caches (class-name embeddings) in a folder of this run, not the user's ~/.cache/vilseg
import tempfile
os.environ.setdefault('VILSEG_CACHE', tempfile.mkdtemp(prefix='vilseg-test-cache-'))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a test of a minute or more (`make test-fast` leaves it out)')
