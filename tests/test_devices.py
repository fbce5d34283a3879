"""The choice of CPU threads by the size of the work."""

from ldm.devices import PARALLEL_WORK, choose_threads

DEMO_UNET = 1_077_572  # models/demo/shapes.safetensors
V1_UNET = 859_520_964  # Stable Diffusion v1


def test_small_work_runs_on_one_thread():
    assert choose_threads(DEMO_UNET, 8 * 8, cores=2) == 1  # the demo model at 64x64
    assert choose_threads(DEMO_UNET, 32 * 32, cores=16) == 1  # ... and at 256x256
    assert choose_threads(100_000, 8 * 8, cores=64) == 1  # the test suite's tiny model


def test_large_work_runs_on_every_core():
    assert choose_threads(V1_UNET, 32 * 32, cores=2) == 2  # v1 at 256x256
    assert choose_threads(DEMO_UNET, 64 * 64, cores=2) == 2  # the demo model at 512x512
    assert choose_threads(V1_UNET, 64 * 64, cores=16) == 16  # v1 at 512x512
    assert choose_threads(V1_UNET, 8 * 8, cores=4) == 4  # v1 even at 64x64


def test_the_boundary_and_degenerate_core_counts():
    assert choose_threads(int(PARALLEL_WORK) // 100, 99, cores=8) == 1
    assert choose_threads(int(PARALLEL_WORK) // 100, 100, cores=8) == 8
    assert choose_threads(V1_UNET, 64 * 64, cores=1) == 1
    assert choose_threads(V1_UNET, 64 * 64, cores=0) == 1
