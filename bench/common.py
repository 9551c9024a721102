"""What the bench scripts share: the machine's practical FLOP/s peak, the denominator of their MFU figures."""
import time
import torch


def matmul_peak(device='cpu', n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of a large square matmul in this process and its threads: fp32 2048² on the CPU, bf16 8192² on CUDA."""
    dev = torch.device(device); cuda = dev.type == 'cuda'
    n = n or (8192 if cuda else 2048)
    x, y = (torch.randn(n, n, device=dev, dtype=torch.bfloat16 if cuda else torch.float32) for _ in range(2))
    for _ in range(2): x @ y
    if cuda: torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps): x @ y
    if cuda: torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)
