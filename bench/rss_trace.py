"""Where a whole image's peak RSS happens: one image through `Txt2Img` (as `bench/peers.py image --tool ours`
runs it: v1 checkpoint, DDIM, guidance 7.5), /proc/self/status sampled every 0.2 s by a thread.

    python bench/rss_trace.py --ckpt /work/bench-data/sd-v1-random.ckpt --steps 2 [--keep text,unet]
    python bench/rss_trace.py --precision bf16 --timeline     # every sample too

Prints, per phase (import, load, encode, sampling, decode), the highest VmRSS seen and its RssAnon /
RssFile split, then the process's high-water mark (VmHWM, what `ru_maxrss` and bench/peers.py report).
Not a test: the sampling misses peaks shorter than its period (VmHWM does not).
"""

import argparse
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.getcwd())

T0 = time.perf_counter()
PHASE = ["import"]
SAMPLES = []  # (t, phase, VmRSS, RssAnon, RssFile) in kB


def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def sampler(stop, period):
    while not stop.is_set():
        s = status()
        SAMPLES.append((time.perf_counter() - T0, PHASE[0], s["VmRSS"], s["RssAnon"], s["RssFile"]))
        stop.wait(period)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/work/bench-data/sd-v1-random.ckpt")
    ap.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--precision", default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--period", type=float, default=0.2)
    ap.add_argument("--timeline", action="store_true", help="also print every sample")
    ap.add_argument("--keep", default="", help="comma-separated: text, unet: leave that module's pages resident "
                                               "(the pipeline's release of them turned off, for an A/B)")
    args = ap.parse_args()
    stop = threading.Event()
    thread = threading.Thread(target=sampler, args=(stop, args.period), daemon=True)
    thread.start()

    import torch

    import ldm.pipeline
    from ldm.pipeline import Txt2Img

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep = {"text": "the text encoder", "unet": "the UNet"}
    kept = {keep[k] for k in args.keep.split(",") if k}
    release = ldm.pipeline._release_idle
    ldm.pipeline._release_idle = lambda module, what: None if what in kept else release(module, what)
    torch.set_num_threads(args.threads)
    PHASE[0] = "load"
    pipe = Txt2Img.from_files(args.config, args.ckpt, device="cpu", precision=args.precision, hash_model=False)
    encode, decode = pipe.conditioning, pipe.decode

    def conditioning(*a, **k):
        PHASE[0] = "encode"
        out = encode(*a, **k)
        PHASE[0] = "sampling"
        return out

    def decoding(*a, **k):
        PHASE[0] = "decode"
        return decode(*a, **k)

    pipe.conditioning, pipe.decode = conditioning, decoding
    t0 = time.perf_counter()
    pipe("a painting of a virus monster playing guitar", steps=args.steps, H=args.size, W=args.size, n_samples=1,
         n_iter=1, seed=42, scale=7.5, sampler="ddim")
    image_s = time.perf_counter() - t0
    PHASE[0] = "end"
    time.sleep(args.period * 2)
    stop.set()
    thread.join()
    hwm = status()["VmHWM"]
    if args.timeline:
        for t, phase, rss, anon, file in SAMPLES:
            print(f"{t:7.1f} s {phase:9s} VmRSS {rss:>9} kB  anon {anon:>9}  file {file:>9}")
    print(f"image {image_s:.1f} s, {args.steps} steps at {args.size}x{args.size}, precision {args.precision}")
    for phase in dict.fromkeys(p for _, p, *_ in SAMPLES):
        rows = [s for s in SAMPLES if s[1] == phase]
        t, _, rss, anon, file = max(rows, key=lambda s: s[2])
        print(f"{phase:9s} max VmRSS {rss:>9} kB (anon {anon:>9}, file {file:>9}) at {t:.1f} s; "
              f"{rows[0][0]:.1f}-{rows[-1][0]:.1f} s")
    print(f"VmHWM {hwm} kB ({hwm * 1024 / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
