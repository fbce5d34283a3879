"""One attention layer beyond 1024 keys, by kernel: ours in C (`native_attention`, AVX-512 and AVX2 where the
CPU has them), the blocked matmuls, the fused kernel on blocks of queries (`fused_attention_blocks`), SDPA;
interleaved rounds, min and median per kernel, and GFLOPS (4 B h N N d: the two products).

    OMP_NUM_THREADS=2 GOMP_SPINCOUNT=10000 python bench/attention.py [--shape 2,8,4096,40] [--rounds 5]

--shape B,h,N,d: 2,8,4096,40 is a UNet self-attention at 512x512 (both halves of the guided batch);
1,1,4096,512 the VAE's. Set an ISA cap in the environment before starting. Not a test: run under the
shared lock, and read the load average it prints.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.backends import kernels, native  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2,8,4096,40")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    B, h, N, d = (int(a) for a in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, N, h * d).view(B, N, h, d).transpose(1, 2) for _ in range(3))  # strided like the UNet's
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    fused = kernels.FusedAttention()
    runs = {f"ours {isa}": (lambda isa=isa: native.attention(q, k, v, isa=isa))
            for isa in ("avx512", "avx2") if native.supports(isa) and native.applies(q, k, v) and native.library()}
    runs.update({"blocked matmuls": lambda: kernels.attention(q, k, v),
            "fused blocks": lambda: fused.in_blocks(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)})
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():
            out = run()  # also the fused kernel's trace
            print(f"{name}: max error / max |ref| {((out - want).abs().max() / want.abs().max()).item():.1e}")
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    print(f"shape {B},{h},{N},{d}, threads {torch.get_num_threads()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, ts in times.items():
        print(f"  {name:16s} min {min(ts) * 1e3:7.1f} ms  median {statistics.median(ts) * 1e3:7.1f} ms  "
              f"{4 * B * h * N * N * d / min(ts) / 1e9:5.0f} GFLOPS")


if __name__ == "__main__":
    main()
