"""The decoder's upsamplers at 512x512 (nearest 2x, then a 3x3 convolution), by kernel: the 3x3 convolution
of the upsampled map (packed weight) against the four 2x2 phase kernels on the small map (`phase_upsample`);
min of 3 each, and the largest difference between the two.

    OMP_NUM_THREADS=2 python bench/upsample.py

Not a test: figures vary with the machine's load; run under the shared lock.
"""

import os
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ldm.backends import kernels  # noqa: E402


def best(f, n=3):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for c, h in [(512, 64), (512, 128), (256, 256)]:  # v1's decoder at 512x512: maps of 64, 128 and 256 upsampled
        x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, c, 3, 3) * 0.02, torch.randn(c)
        with torch.no_grad():
            packed = kernels.pack_conv_weight(w, (1, 1), (1, 1), (1, 1), 1, (1, c, 2 * h, 2 * h))
            phases = [kernels.pack_conv_weight(k, (0, 0), (1, 1), (1, 1), 1, (1, c, h + 1, h + 1))
                      for k in kernels.phase_weights(w)]

            def plain():
                return kernels.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), packed, b, (1, 1), (1, 1), (1, 1), 1)

            def phase():
                return kernels.upsampled_conv(x, phases, b, c, False)

            ref, got = plain(), phase()
            err = ((ref - got).abs().max() / ref.abs().max()).item()
            print(f"{c} channels, {h}x{h} -> {2 * h}x{2 * h}: 3x3 conv of the upsampled map {best(plain):.3f} s, "
                  f"phase kernels {best(phase):.3f} s (relative difference {err:.1e})")


if __name__ == "__main__":
    main()
