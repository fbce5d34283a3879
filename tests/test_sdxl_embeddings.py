"""SDXL textual inversion (`clip_l` / `clip_g` files) and --clip_skip on the tiny SDXL models of test_sdxl.

The reference for an embedding word: the same prompt with ordinary words in its place, on a copy of the
model whose two token tables hold the file's vectors at those words' rows (CLIP-L the clip_l vectors, bigG
the clip_g ones). Context and pooled output must then agree exactly as far as float rounding goes.
"""

import copy
import hashlib

import pytest
import torch
from safetensors.torch import save_file
from test_sdxl import BIGG_W, CLIP_W, tiny_base, tiny_files, tiny_refiner  # noqa: F401 (fixtures)


def _pipe(model, embeddings_dir):
    from ldm.pipeline import Txt2Img

    return Txt2Img(model, "cpu", "full", embeddings_dir=embeddings_dir)


def _write(folder, name, n, widths=(("clip_l", CLIP_W), ("clip_g", BIGG_W)), seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(n, w, generator=g) for k, w in widths}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    return tensors


def _with_rows(model, words, tensors):
    """A copy of the model whose token tables hold the vectors at the rows of `words`."""
    ids = [i for w in words for i in model.conditioner.tokenizer.encode(w)]
    assert len(ids) == len(words)  # each a single token
    ref = copy.deepcopy(model)
    for encoder in ref.conditioner.text_encoders:
        if hasattr(encoder, "transformer"):  # CLIP-L
            table, vectors = encoder.transformer.text_model.embeddings.token_embedding, tensors["clip_l"]
        else:  # bigG
            table, vectors = encoder.model.token_embedding, tensors["clip_g"]
        with torch.no_grad():
            table.weight[ids] = vectors.to(table.weight.dtype)
    return ref


@torch.no_grad()
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_embedding_word_equals_its_vectors_in_each_encoder(which, tiny_base, tiny_refiner, tmp_path):  # noqa: F811
    _, model = tiny_base if which == "base" else tiny_refiner
    tensors = _write(tmp_path / "emb", "mychar", 2)
    _write(tmp_path / "emb", "other", 1, seed=1)
    pipe = _pipe(model, tmp_path / "emb")
    # 'other' loads first: mychar's placeholder ids are not the first ones
    pipe.conditioning("other", "")
    (c, pooled), _ = pipe.conditioning("a (photo:1.2) of mychar at dusk", "blurry")
    ids = pipe._tokens("a (photo:1.2) of mychar at dusk", True).ids
    assert int(ids.max()) > 49407  # placeholders are in the ids, beyond the end-of-text token

    ref = _pipe(_with_rows(model, ["cat", "dog"], tensors), tmp_path / "none")
    (c_ref, pooled_ref), _ = ref.conditioning("a (photo:1.2) of cat dog at dusk", "blurry")
    assert c.shape == c_ref.shape and pooled.shape == pooled_ref.shape
    assert torch.allclose(c, c_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pooled, pooled_ref, atol=1e-5, rtol=1e-5)

    # without the file the word is plain text: a different context and pooled output
    (c_plain, pooled_plain), _ = _pipe(model, tmp_path / "none").conditioning("a (photo:1.2) of mychar at dusk", "blurry")
    assert not torch.allclose(c, c_plain, atol=1e-3) and not torch.allclose(pooled, pooled_plain, atol=1e-3)


@torch.no_grad()
def test_embedding_missing_a_tower_is_left_as_text(tiny_base, tmp_path):  # noqa: F811
    _, model = tiny_base
    _write(tmp_path / "emb", "half", 1, widths=(("clip_l", CLIP_W),))
    pipe = _pipe(model, tmp_path / "emb")
    plain = _pipe(model, tmp_path / "none")
    (c, pooled), _ = pipe.conditioning("a photo of half", "")
    (c_plain, pooled_plain), _ = plain.conditioning("a photo of half", "")
    assert torch.equal(c, c_plain) and torch.equal(pooled, pooled_plain)


@torch.no_grad()
def test_pooled_at_the_first_end_of_text_token(tiny_base):  # noqa: F811
    """An id above end-of-text (a placeholder) does not move the pooling position."""
    from ldm.models.sdxl import EOS

    _, model = tiny_base
    bigg = model.conditioner.pooled_encoder
    vocab = bigg.model.token_embedding.num_embeddings
    ids = torch.tensor([[49406, 320, vocab, 1929, EOS] + [0] * 72])
    vectors = torch.randn(1, BIGG_W)
    _, pooled = bigg.encode_with_pooled(ids, vectors)
    # by hand: ln_final of the last block's output at position 4, through the projection
    tower = bigg.model
    x = torch.cat([tower.token_embedding(ids[:, :2]), vectors[None], tower.token_embedding(ids[:, 3:])], 1)
    x = x + tower.positional_embedding[:77]
    for block in tower.transformer.resblocks:
        x = block(x)
    expected = tower.ln_final(x)[:, 4] @ tower.text_projection
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_clip_skip_on_sdxl(tiny_base):  # noqa: F811
    from ldm.networks import clip_skip_error

    _, model = tiny_base
    assert clip_skip_error(model, 1) is None and clip_skip_error(model, 2) is None
    err = clip_skip_error(model, 3)
    assert "SDXL fixes its text layers" in err and "\n" not in err
    # 1 and 2 give the same conditioning (the fixed layers)
    pipe = _pipe(model, None)
    with torch.no_grad():
        (c1, p1), _ = pipe.conditioning("a red fox", "", clip_skip=1)
        (c2, p2), _ = pipe.conditioning("a red fox", "", clip_skip=2)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)


def test_cli_refuses_clip_skip_3_on_sdxl_in_one_line(tiny_files, tmp_path):  # noqa: F811
    from test_sdxl import run_cli

    config, ckpt = tiny_files["base"]
    code, out, err = run_cli(["--config", config, "--ckpt", ckpt, "--ddim_steps", 1, "--outdir", tmp_path,
                              "--no_safety_checker", "--no_watermark", "--n_samples", 1, "--n_iter", 1,
                              "--H", 64, "--W", 64, "--prompt", "a fox", "--clip_skip", 3])
    assert code != 0 and "SDXL fixes its text layers" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").iterdir())


def test_cli_lora_tag_and_embedding_on_sdxl(tiny_files, tmp_path, monkeypatch):  # noqa: F811
    """A kohya file with lora_unet_ / lora_te1_ / lora_te2_ keys changes the image and is named in the PNG,
    with the SDXL embedding's TI hash."""
    import numpy as np
    from PIL import Image
    from test_lora import _random_lora
    from test_sdxl import run_cli

    from ldm.checkpoint import build_model
    from ldm.config import load_config
    from ldm.images import parse_parameters, read_parameters
    from ldm.lora import lora_targets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, ckpt = tiny_files["base"]
    model = build_model(load_config(config), "meta")
    table, _ = lora_targets(model)
    params = dict(model.named_parameters())
    shapes = {}
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        names = sorted(n for n in table if n.startswith(prefix) and params[table[n].key].dim() == 2)[:3]
        assert len(names) == 3, prefix
        for n in names:
            t = table[n]
            rows = params[t.key].shape[0] if t.rows is None else t.rows[1] - t.rows[0]
            shapes[n] = (rows, params[t.key].shape[1])
    del model
    (tmp_path / "Lora").mkdir()
    save_file(_random_lora(shapes, seed=8, alpha=4.0), str(tmp_path / "Lora" / "detail.safetensors"))
    _write(tmp_path / "emb", "mychar", 2)
    common = ["--config", config, "--ckpt", ckpt, "--H", 64, "--W", 64, "--ddim_steps", 2, "--no_safety_checker",
              "--no_watermark", "--lora_dir", tmp_path / "Lora", "--embeddings_dir", tmp_path / "emb", "--n_iter", 1,
              "--n_samples", 1, "--seed", 7]
    code, _, err = run_cli(common + ["--outdir", tmp_path / "lora", "--prompt", "a fox <lora:detail:1.5>, mychar"])
    assert code == 0, err
    code, _, err = run_cli(common + ["--outdir", tmp_path / "plain", "--prompt", "a fox, mychar"])
    assert code == 0, err
    with_lora, plain = tmp_path / "lora/samples/00000.png", tmp_path / "plain/samples/00000.png"
    assert not np.array_equal(np.asarray(Image.open(with_lora)), np.asarray(Image.open(plain)))
    s = parse_parameters(read_parameters(with_lora))["settings"]
    data = (tmp_path / "Lora" / "detail.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")  # the "addnet" hash: the tensors after the header
    assert s["Lora hashes"] == f"detail: {hashlib.sha256(data[8 + header:]).hexdigest()[:12]}"
    emb_hash = hashlib.sha256((tmp_path / "emb" / "mychar.safetensors").read_bytes()).hexdigest()[:12]
    assert s["TI hashes"] == f"mychar: {emb_hash}"
    assert "Lora hashes" not in parse_parameters(read_parameters(plain))["settings"]
    # the text encoders' part alone (UNet multiplier 0) changes the image too
    code, _, err = run_cli(common + ["--outdir", tmp_path / "te", "--prompt", "a fox <lora:detail:1.5:0>, mychar"])
    assert code == 0, err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "te/samples/00000.png")), np.asarray(Image.open(plain)))
