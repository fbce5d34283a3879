"""Hostile checkpoint files: seeded corruptions of the demo `.safetensors` and of a small `.ckpt`.

Every corrupted file must end in one of two ways: it loads, or `read_state_dict` / `load_model` raise
one `CheckpointError` line. A file that loads with a different structure (keys, shapes, or a float
weight turned non-float) must be reported as a mismatch by `load_model`. A byte flip inside tensor
data loads with other values, or a float dtype read as another float dtype: that is data, not
structure, and the loader takes any float dtype by design. Never another exception, a hang or a crash.

The safetensors cases run in-process (our own reader checks bounds before viewing memory); the `.ckpt`
cases go through torch's C++ zip and pickle readers, so they run in a subprocess that reports each case
before trying it: a crash there names the case. A few cases go through the command line as well.
"""

import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo" / "shapes.safetensors"
DEMO_CONFIG = REPO / "configs" / "demo" / "shapes.yaml"

FAST_ST_CASES, SLOW_ST_CASES = 100, 3000
FAST_CKPT_CASES, SLOW_CKPT_CASES = 30, 600  # of each: zip and legacy


def structure(sd):
    """What a load must keep: names, shapes, and whether each tensor is a float."""
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in sd.items()}


def outcome(path, config, clean):
    """'loaded' (same structure), 'refused' (reading failed) or 'mismatch' (load_model refused a
    different structure); anything else raises."""
    from ldm.checkpoint import CheckpointError, load_model, read_state_dict

    try:
        sd = read_state_dict(path)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return "refused", msg
    if structure(sd) == clean:
        return "loaded", ""
    try:
        load_model(config, path)
    except CheckpointError as e:
        assert "\n" not in str(e), str(e)
        return "mismatch", str(e)
    raise AssertionError(f"{path} loaded with a structure different from the clean file's, and no mismatch was reported")


# ----------------------------------------------------------------------------- safetensors corruptions


def _split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _assemble(header, body, raw=None):
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + body


def _header_edits(header, rng):
    """(label, edited header copy) for one random edit of one random entry."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    start, end = info["data_offsets"]
    h = json.loads(json.dumps(header))
    e = h[name]
    other = h[rng.choice([k for k in names if k != name])]
    edits = {
        "shape huge": lambda: e.update(shape=e["shape"] + [2**40]),
        "shape negative": lambda: e.update(shape=[-d for d in e["shape"]] or [-1]),
        "shape 2^63": lambda: e.update(shape=[2**63, 0]),
        "shape 2^64": lambda: e.update(shape=[2**64]),
        "shape overflowing strides": lambda: e.update(shape=[0, 2**40, 2**40]),
        "shape float": lambda: e.update(shape=[1.5]),
        "shape string": lambda: e.update(shape="3"),
        "shape bool": lambda: e.update(shape=[True] * 2),
        "shape nested": lambda: e.update(shape=[e["shape"]]),
        "shape 65 dims": lambda: e.update(shape=[1] * 65),
        "shape null": lambda: e.update(shape=None),
        "shape transposed": lambda: e.update(shape=list(reversed(e["shape"]))),
        "shape flattened": lambda: e.update(shape=[(end - start) // {"F16": 2, "F32": 4}.get(e["dtype"], 8)]),
        "shape plus one": lambda: e.update(shape=[d + 1 for d in e["shape"]] or [1]),
        "dtype unknown": lambda: e.update(dtype="F17"),
        "dtype empty": lambda: e.update(dtype=""),
        "dtype number": lambda: e.update(dtype=16),
        "dtype wider": lambda: e.update(dtype={"F16": "F32", "F32": "F64", "I64": "F32"}[e["dtype"]]),
        "dtype same size int": lambda: e.update(dtype={"F16": "I16", "F32": "I32", "I64": "F64"}[e["dtype"]]),
        "dtype same size float": lambda: e.update(dtype={"F16": "BF16", "F32": "F32", "I64": "I64"}[e["dtype"]]),
        "offsets swapped": lambda: e.update(data_offsets=[end, start]),
        "offsets past the end": lambda: e.update(data_offsets=[start + 2**40, end + 2**40]),
        "offsets 2^64": lambda: e.update(data_offsets=[0, 2**64]),
        "offsets negative": lambda: e.update(data_offsets=[-start - 2, end]),
        "offsets one": lambda: e.update(data_offsets=[start]),
        "offsets strings": lambda: e.update(data_offsets=[str(start), str(end)]),
        "offsets shifted": lambda: e.update(data_offsets=[start + 2, end + 2]),
        "offsets of another tensor": lambda: e.update(data_offsets=other["data_offsets"], shape=other["shape"],
                                                      dtype=other["dtype"]),
        "no dtype": lambda: e.pop("dtype"),
        "no shape": lambda: e.pop("shape"),
        "no data_offsets": lambda: e.pop("data_offsets"),
        "entry a list": lambda: h.update({name: [info["dtype"], info["shape"]]}),
        "entry null": lambda: h.update({name: None}),
        "entry a string": lambda: h.update({name: "F16"}),
        "name renamed": lambda: h.update({name[:-1] + "x": h.pop(name)}),
        "name with a newline": lambda: h.update({name + "\n": h.pop(name)}),
        "entry removed": lambda: h.pop(name),
        "empty tensor added": lambda: h.update({"extra.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}),
        "metadata number": lambda: h.update(__metadata__={"format": 1}),
        "metadata list": lambda: h.update(__metadata__=["pt"]),
        "metadata fine": lambda: h.update(__metadata__={"format": "pt"}),
        "extra field": lambda: e.update(note="hello"),
    }
    label = rng.choice(sorted(edits))
    edits[label]()
    return f"edit {label} of {name!r}", h


def _raw_headers(n, rng):
    """(label, header bytes) of the same length n: not JSON, or JSON of the wrong kind."""
    def pad(b):
        return (b + b" " * n)[:n]

    choices = {
        "random bytes": lambda: bytes(rng.randrange(256) for _ in range(n)),
        "invalid utf-8": lambda: pad(b'{"\xff\xfe": 1}'),
        "deep nesting": lambda: b"[" * n,
        "deep objects": lambda: pad(b'{"a":' * (n // 6)),
        "huge integer": lambda: pad(b'{"x": {"dtype": "F16", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 2]}}'),
        "NaN shape": lambda: pad(b'{"x": {"dtype": "F16", "shape": [NaN], "data_offsets": [0, 2]}}'),
        "a list": lambda: pad(b"[1, 2, 3]"),
        "a string": lambda: pad(b'"safetensors"'),
        "null": lambda: pad(b"null"),
        "empty object": lambda: pad(b"{}"),
        "zeros": lambda: b"\x00" * n,
    }
    label = rng.choice(sorted(choices))
    return label, choices[label]()


def _duplicate_name(header, rng):
    name = rng.choice([k for k in header if k != "__metadata__"])
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps({name: header[name]}, separators=(",", ":"))[1:-1]
    return f"duplicate name {name!r}", ("{" + entry + "," + text[1:]).encode()


def safetensors_cases(data, count, seed):
    """`count` seeded (label, corrupted bytes) of a safetensors file."""
    rng = random.Random(seed)
    n, header, body = _split(data)
    size = len(data)
    kinds = ["truncate", "flip header byte", "flip header bit", "flip any byte", "length field", "header edit",
             "header edit", "header edit", "raw header", "duplicate name"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "truncate":
            cut = rng.choice([rng.randrange(0, 16), rng.randrange(8, 8 + n), rng.randrange(8 + n, size)])
            yield f"{i}: truncated to {cut} bytes", data[:cut]
        elif kind in ("flip header byte", "flip header bit", "flip any byte"):
            pos = rng.randrange(0, size if kind == "flip any byte" else 8 + n)
            mask = 1 << rng.randrange(8) if kind == "flip header bit" else rng.randrange(1, 256)
            out = bytearray(data)
            out[pos] ^= mask
            yield f"{i}: byte {pos} ^= {mask:#x}", bytes(out)
        elif kind == "length field":
            value = rng.choice([2**62, 2**64 - 1, 2**63, 0, 1, n - 1, n + 1, size - 8, size - 7, size, 100 * 2**20 + 1])
            yield f"{i}: header length {value}", struct.pack("<Q", value) + data[8:]
        elif kind == "header edit":
            label, h = _header_edits(header, rng)
            yield f"{i}: {label}", _assemble(h, body)
        elif kind == "raw header":
            label, raw = _raw_headers(n, rng)
            yield f"{i}: header {label}", _assemble(None, body, raw)
        else:
            label, raw = _duplicate_name(header, rng)
            yield f"{i}: {label}", _assemble(None, body, raw)


def _sweep_safetensors(tmp_path, count, seed):
    from ldm.checkpoint import read_state_dict

    if not DEMO.is_file():
        pytest.skip("the bundled demo model is not in this checkout")
    data = DEMO.read_bytes()
    clean = structure(read_state_dict(DEMO))
    path = tmp_path / "fuzzed.safetensors"
    seen = {"loaded": 0, "refused": 0, "mismatch": 0}
    for label, corrupted in safetensors_cases(data, count, seed):
        path.write_bytes(corrupted)
        try:
            kind, _ = outcome(path, DEMO_CONFIG, clean)
        except BaseException as e:
            raise AssertionError(f"case {label}: {type(e).__name__}: {e}") from e
        seen[kind] += 1
    # The mix proves the sweep reaches every path: loads, refusals and loader mismatches.
    assert seen["refused"] > count // 2 and seen["loaded"] > 0 and seen["mismatch"] > 0, seen
    return seen


def test_corrupted_safetensors_load_or_fail_in_one_line(tmp_path):
    _sweep_safetensors(tmp_path, FAST_ST_CASES, seed=0)


@pytest.mark.slow
def test_corrupted_safetensors_large_sweep(tmp_path):
    _sweep_safetensors(tmp_path, SLOW_ST_CASES, seed=1)


# ----------------------------------------------------------------------------- .ckpt corruptions


def small_config():
    """A config smaller than TINY (one UNet level, one CLIP layer, a 1000-token vocabulary): a 6 MB .ckpt."""
    cfg = tiny_config()
    p = cfg["model"]["params"]
    p["cond_stage_config"]["params"].update(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64)
    p["unet_config"]["params"].update(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1], context_dim=32)
    p["first_stage_config"]["params"]["ddconfig"].update(ch_mult=[1, 2], num_res_blocks=1)
    return cfg


def write_small_ckpt(folder, legacy=False):
    """The small model's random weights in the original layout (`state_dict` wrapper, training counters)."""
    import torch
    from omegaconf import OmegaConf

    from helpers import randomize_
    from ldm.checkpoint import build_model

    cfg = small_config()
    config = Path(folder) / "small.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    sd = {k: v.contiguous() for k, v in randomize_(build_model(cfg, "cpu"), seed=5).state_dict().items()}
    path = Path(folder) / ("legacy.ckpt" if legacy else "small.ckpt")
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path, _use_new_zipfile_serialization=not legacy)
    return config, path


def ckpt_cases(data, count, seed, pickle_span):
    """`count` seeded (label, corrupted bytes) of a .ckpt; `pickle_span` is where the pickle lies."""
    rng = random.Random(seed)
    size = len(data)
    lo, hi = pickle_span
    for i in range(count):
        kind = i % 5
        out = bytearray(data)
        if kind == 0:
            cut = rng.choice([rng.randrange(0, 64), rng.randrange(lo, hi), rng.randrange(0, size),
                              size - rng.randrange(1, 200)])
            yield f"{i}: truncated to {cut} bytes", data[:cut]
            continue
        if kind in (1, 2):  # the pickle: names, sizes, strides, offsets of every tensor
            pos = rng.randrange(lo, hi)
        elif kind == 3:  # the zip directory and record headers at the end, or the legacy storage headers
            pos = rng.randrange(max(0, size - 4096), size) if rng.random() < 0.5 else rng.randrange(0, size)
        else:
            n = rng.randrange(2, 12)
            positions = [rng.randrange(lo, hi) for _ in range(n)]
            for p in positions:
                out[p] = rng.randrange(256)
            yield f"{i}: {n} pickle bytes randomized at {positions}", bytes(out)
            continue
        mask = rng.randrange(1, 256)
        out[pos] ^= mask
        yield f"{i}: byte {pos} ^= {mask:#x}", bytes(out)


def pickle_span(path):
    """Byte range of the pickle in a .ckpt: data.pkl's stored bytes in a zip file, the head of a legacy one."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        return start, start + info.compress_size
    data = Path(path).read_bytes()
    return 0, min(len(data), 64 * 1024)


def ckpt_worker(config, clean_paths, count, seed, workdir):
    """Runs in a subprocess: one line per case, `start <label>` before trying it, then the outcome."""
    from ldm.checkpoint import read_state_dict

    for clean_path in clean_paths:
        clean = structure(read_state_dict(clean_path))
        data = Path(clean_path).read_bytes()
        path = Path(workdir) / ("fuzzed-" + Path(clean_path).name)
        for label, corrupted in ckpt_cases(data, count, seed, pickle_span(clean_path)):
            label = f"{Path(clean_path).name} {label}"
            print(json.dumps({"start": label}), flush=True)
            path.write_bytes(corrupted)
            try:
                kind, msg = outcome(path, config, clean)
            except BaseException as e:
                print(json.dumps({"case": label, "kind": "error", "msg": f"{type(e).__name__}: {e}"}), flush=True)
                continue
            print(json.dumps({"case": label, "kind": kind, "msg": msg}), flush=True)


def _sweep_ckpt(tmp_path, count, seed):
    """`count` cases of a zip .ckpt and of a legacy one, in one subprocess."""
    config, zipped = write_small_ckpt(tmp_path)
    _, legacy = write_small_ckpt(tmp_path, legacy=True)
    clean = [str(zipped), str(legacy)]
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; import test_fuzz; "
            f"test_fuzz.ckpt_worker({str(config)!r}, {clean!r}, {count}, {seed}, {str(tmp_path)!r})")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120 + 6 * count,
                       env=env, cwd=tmp_path)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    last = next((line["start"] for line in reversed(lines) if "start" in line), None)
    assert r.returncode == 0, f"the reader crashed (exit {r.returncode}) on case {last}: {r.stderr[-2000:]}"
    results = [line for line in lines if "case" in line]
    assert len(results) == 2 * count
    errors = [f"{line['case']}: {line['msg']}" for line in results if line["kind"] == "error"]
    assert not errors, "\n".join(errors[:10])
    for name in ("small.ckpt", "legacy.ckpt"):
        mine = [line["kind"] for line in results if line["case"].startswith(name)]
        kinds = {k: mine.count(k) for k in ("loaded", "refused", "mismatch")}
        assert kinds["refused"] > 0 and kinds["loaded"] > 0 and kinds["mismatch"] > 0, (name, kinds)


def test_corrupted_ckpt_load_or_fail_in_one_line(tmp_path):
    _sweep_ckpt(tmp_path, FAST_CKPT_CASES, seed=0)


@pytest.mark.slow
def test_corrupted_ckpt_large_sweep(tmp_path):
    _sweep_ckpt(tmp_path, SLOW_CKPT_CASES, seed=1)


# ----------------------------------------------------------------------------- named cases and the command line


def _demo_parts():
    if not DEMO.is_file():
        pytest.skip("the bundled demo model is not in this checkout")
    return _split(DEMO.read_bytes())


def _named_cases():
    """The issue's three tracebacks and one of each kind of bad header, with the line each must give."""
    n, header, body = _demo_parts()
    name = "model.diffusion_model.out.2.weight"
    a, b = "model.diffusion_model.out.2.bias", "model.diffusion_model.out.0.weight"

    def edited(**change):
        h = json.loads(json.dumps(header))
        h[name].update(change)
        return _assemble(h, body)

    overlap = json.loads(json.dumps(header))
    overlap[a]["data_offsets"] = [overlap[b]["data_offsets"][0], overlap[b]["data_offsets"][0] + 8]
    return {
        "header length 2^62": (struct.pack("<Q", 2**62) + DEMO.read_bytes()[8:],
                               "header length 4611686018427387904 exceeds the file"),
        "random bytes": (bytes(random.Random(3).randrange(256) for _ in range(4096)), "malformed safetensors file"),
        "shape beyond the data": (edited(shape=[4, 320, 3, 3 * 1000]), f"tensor {name!r} shape [4, 320, 3, 3000] of"),
        "negative shape": (edited(shape=[-4, 320, 3, 3]), "is not a list of non-negative integers"),
        "unknown dtype": (edited(dtype="F12"), "unknown dtype 'F12'"),
        "offsets outside": (edited(data_offsets=[0, 2**40]), "lie outside the data section"),
        "overlap": (_assemble(overlap, body), "overlaps"),
        "duplicate": (_assemble(None, body, _duplicate_name_of(header, name)), f"{name!r} appears twice"),
        "not json": (_assemble(None, body, b"{oops" + b" " * 20), "the header is not valid JSON"),
        "metadata": (_assemble(dict(header, __metadata__={"format": ["pt"]}), body), "__metadata__ is not a map"),
    }


def _duplicate_name_of(header, name):
    text = json.dumps(header, separators=(",", ":"))
    return ("{" + json.dumps({name: header[name]})[1:-1] + "," + text[1:]).encode()


def test_named_hostile_headers_give_their_line(tmp_path):
    from ldm.checkpoint import CheckpointError, read_state_dict

    for label, (data, expected) in _named_cases().items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            read_state_dict(path)
        msg = str(e.value)
        assert expected in msg and str(path) in msg and "\n" not in msg, (label, msg)


def _cli_args(ckpt, outdir):
    return ["--config", str(DEMO_CONFIG), "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--n_samples", "1",
            "--n_iter", "1", "--ddim_steps", "1", "--no_safety_checker", "--outdir", str(outdir)]


@pytest.mark.slow
def test_command_line_reports_a_hostile_checkpoint_in_one_line(tmp_path):
    """Every named case through `main` in-process, and two through the command line in subprocesses:
    exit 1, one `txt2img: error:` line naming the file, no traceback, nothing written."""
    import contextlib
    import io

    from ldm.cli import main

    outdir = tmp_path / "out"
    files = {}
    for label, (data, expected) in _named_cases().items():
        path = files[label] = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(_cli_args(path, outdir))
        assert code == 1 and err.getvalue().count("\n") == 1, (label, err.getvalue())
        assert err.getvalue().startswith("txt2img: error: malformed safetensors file") and str(path) in err.getvalue()
    _, ckpt = write_small_ckpt(tmp_path)
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [(path, subprocess.Popen([sys.executable, "-m", "ldm.cli", *_cli_args(path, outdir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
             for path in (files["shape beyond the data"], cut)]
    for path, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("txt2img: error: ") and "Traceback" not in err, err
        assert str(path) in err
    assert not (outdir / "samples").exists() or not list((outdir / "samples").iterdir())
