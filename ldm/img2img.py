"""Image to image and the hires fix: a latent noised part-way, then denoised by any sampler from there.

    from ldm.img2img import Img2Img, load_init_image
    pipe = Img2Img.from_files(None, "models/ldm/stable-diffusion-v1/model.ckpt")
    image, note = load_init_image("sketch.png")
    results = pipe(image, "a watercolor fox", strength=0.75, steps=50, seed=7, n_samples=1, n_iter=1)

The original img2img.py, step by step, and what is done here:

- the init image, RGB, is resized down to a multiple of 32 with LANCZOS (`load_init_image`; here to the
  multiple the model needs when that is larger, 64 for the SD UNets' three downsamplings);
- it is encoded to a latent by *sampling* the autoencoder's posterior, scaled by scale_factor
  (`get_first_stage_encoding`). The original draws that sample from the global RNG after the model load;
  here image k draws it from a CPU generator seeded with its seed (seed + k), as the draw that follows its
  noise, so an image is reproducible from its seed alone;
- with t_enc = int(strength * ddim_steps), the latent is noised with the item's noise (txt2img's start
  code of the same seed: the generator's first draw) to the level of the sampler's schedule that
  `samplers.img2img_plan` names (for DDIM the original's `stochastic_encode` at index t_enc of the DDIM
  schedule), then the last t_enc steps of the schedule are run (`denoise_from`);
- strength 0 runs no step: the result is the encoded latent itself (the original would still add the
  noise of the first DDIM time and run nothing); strength 1 runs every step from a latent noised one DDIM
  stride above the top time, capped at the last training time (the original indexes past its schedule).

Masked img2img (`set_mask`, white = repaint) with an ordinary checkpoint: at every model evaluation the
predicted clean latent is replaced by the init latent outside the mask (the web UIs' way, which needs no
change to any sampler), the final latent takes the init latent there, and the decoded picture is pasted
over the init image through the (blurred) mask, so the unmasked pixels come back exactly. A dedicated
inpainting checkpoint (the original's LatentInpaintDiffusion, 9-channel UNet: sd-v1-5-inpainting) instead gets the mask (1 = repaint, the blurred mask thresholded at 1/2, nearest
at latent size) and the latent of the masked image (the init image with the hole set to 0, i.e. gray; the
posterior mean) concatenated to its input at every evaluation, as the original's inpainting scripts do;
at strength 1 it starts from pure noise (txt2img's start code), as they do.

The hires fix (`hires_pass`, txt2img's --hr_scale) is img2img of txt2img's first pass at S times the size,
in the same run: the latent upscaled (bilinear, the web UI's "Latent"), or the decoded picture resized
with LANCZOS and encoded again ("lanczos"), then noised and denoised at the larger size. Its noise comes
from the item's seed at the larger shape, as the web UI re-seeds the second pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .planning import WorkItem, check_counts, plan_work, prompt_batches
from .pipeline import Options, Result, Txt2Img, latent_factor
from .samplers import img2img_plan, schedule
from .samplers import sample as run_sampler
from .samplers.parameterization import eps_and_x0

log = logging.getLogger(__name__)

ORIGINAL_MULTIPLE = 32  # the original img2img.py resizes the init image to a multiple of 32
HIRES_UPSCALERS = ("latent", "lanczos")


# ----------------------------------------------------------------------------- the init image


def load_init_image(path, multiple: int = ORIGINAL_MULTIPLE) -> tuple[Image.Image, str | None]:
    """(the RGB image at `path` resized down to a multiple of `multiple` with LANCZOS, a notice when it
    was resized or None). ValueError, one line, for a missing, unreadable or too small file."""
    return fit_size(read_init_image(path), multiple, f"--init-img {path}")


def read_init_image(path, flag: str = "--init-img") -> Image.Image:
    """The image at `path` as RGB; ValueError, one line, for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {path} is not a file")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    return image


def fit_size(image: Image.Image, multiple: int, what: str = "the init image") -> tuple[Image.Image, str | None]:
    """The image resized down to sides that are multiples of `multiple` (LANCZOS), and a notice if it was."""
    w, h = image.size
    W, H = w - w % multiple, h - h % multiple
    if W == 0 or H == 0:
        raise ValueError(f"{what} is {w}x{h} pixels: both sides must be at least {multiple}")
    if (W, H) == (w, h):
        return image, None
    note = f"{what}: {w}x{h} resized to {W}x{H} (sides a multiple of {multiple}, LANCZOS, as the original img2img.py)"
    return image.resize((W, H), resample=Image.LANCZOS), note


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, H, W] float32 in [-1, 1], as the original's load_img."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # (H, W, 3)
    return x.permute(2, 0, 1)[None] * 2.0 - 1.0


def item_noise(model, posterior, seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, z_0) of one image: from a CPU generator seeded with `seed`, its first draw the noise
    [C, h, w] (txt2img's start code of that seed), then the posterior sample of the encoded latent,
    scaled (`get_first_stage_encoding`)."""
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(list(shape), generator=g)
    z0 = model.get_first_stage_encoding(posterior, generator=g)[0]
    return noise, z0


# ----------------------------------------------------------------------------- the part-way run


def denoise_from(pipe: Txt2Img, items: list[WorkItem], opts: Options, z0: torch.Tensor, noise: torch.Tensor,
                 steps: int, strength: float, callback=None, keep=None) -> torch.Tensor:
    """img2img's core for items sampled together: z0 and noise [B, C, h, w] noised to the level
    `img2img_plan` gives for `strength`, then the last int(strength * steps) steps of the sampler;
    z0 itself when that is no step. Guidance as `pipe.guided_denoiser(items, opts)`; the step noise of a
    stochastic sampler from the first item's seed, as txt2img. `keep` [1, 1, h, w] in [0, 1]: where the
    result is to stay z0 (masked img2img, see `known_region_denoiser`)."""
    ac = pipe.model.alphas_cumprod
    first_step, a = img2img_plan(opts.sampler, ac, steps, strength)
    if first_step == steps:
        return z0
    x = math.sqrt(a) * z0.float() + math.sqrt(1.0 - a) * noise.float()
    generator = torch.Generator("cpu").manual_seed(items[0].seed)
    parameterization = getattr(pipe.model, "parameterization", "eps")
    model_fn = pipe.guided_denoiser(items, opts)
    if keep is not None:
        model_fn = known_region_denoiser(model_fn, z0.float(), keep, ac, parameterization)
    z = run_sampler(opts.sampler, model_fn, x, ac, steps, generator=generator, callback=callback, eta=opts.eta,
                    parameterization=parameterization, first_step=first_step)
    return z if keep is None else keep * z0.float() + (1 - keep) * z


def known_region_denoiser(model_fn, z0: torch.Tensor, keep: torch.Tensor, alphas_cumprod, parameterization="eps"):
    """model_fn whose predicted clean latent is z0 where `keep` is 1 (blended where it is between): the
    output (eps or v) is recomputed from x_t and that x_0 at the noise level of t (exact at the integer
    times of DDIM and PLMS; interpolated in log sigma at the fractional times of the k-diffusion family)."""
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)

    def denoise(x, t):
        out = model_fn(x, t)
        sigma = schedule.t_to_sigma(float(t[0]), train_sigmas, "log").item()
        a = 1.0 / (sigma**2 + 1)
        eps, x0 = eps_and_x0(out, x, a, parameterization)
        x0 = keep * z0 + (1 - keep) * x0
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return eps if parameterization == "eps" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0

    return denoise


def steps_run(steps: int, strength: float) -> int:
    """How many sampler steps an img2img run of `steps` at `strength` makes: int(strength * steps)."""
    return int(strength * steps)


class Img2Img(Txt2Img):
    """Txt2Img that reworks an init image (`set_init_image`) instead of starting from noise.

    `opts.strength` (default 0.75) is the denoising strength; opts.H and opts.W must be the init image's
    size (`__call__` sets them). The encoder runs once per init image; each image of a run then samples
    its own latent from that posterior with its own seed (see the module docstring).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_image = None
        self._posterior = None
        self.mask = None  # L image at the init image's size, blurred: 255 = repaint (set_mask)
        self._concat = None  # [1, 5, h, w]: mask and masked-image latent of an inpainting model, for the run

    @property
    def size_multiple(self) -> int:
        """The multiple of 32 the init image's sides are resized to: at least what the model needs."""
        need = latent_factor(self.model) * self.model.model.diffusion_model.downsample_factor
        return math.lcm(ORIGINAL_MULTIPLE, need)

    def set_init_image(self, image: Image.Image, what: str = "the init image") -> str | None:
        """Take `image` as the init image of the next runs, resized as `fit_size` does; returns the notice."""
        image, note = fit_size(image.convert("RGB"), self.size_multiple, what)
        self.init_image, self._posterior, self.mask = image, None, None
        return note

    def set_mask(self, mask: Image.Image, blur: int = 4, what: str = "the mask") -> str | None:
        """Repaint only where `mask` is white (after the init image: a mask of another size is resized to
        it, and the notice returned); `blur` is the radius of a Gaussian blur that softens its edge."""
        if self.init_image is None:
            raise ValueError("set the init image before the mask")
        mask, note = mask.convert("L"), None
        if mask.size != self.init_image.size:
            note = (f"{what}: {mask.size[0]}x{mask.size[1]} resized to the init image's "
                    f"{self.init_image.size[0]}x{self.init_image.size[1]}")
            mask = mask.resize(self.init_image.size, resample=Image.LANCZOS)
        self.mask = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
        self.mask_blur = blur
        return note

    @property
    def inpainting(self) -> bool:
        """Whether the model is a dedicated (9-channel) inpainting model."""
        from .models.diffusion import LatentInpaintDiffusion

        return isinstance(self.model, LatentInpaintDiffusion)

    def inpaint_concat(self, latent_size) -> torch.Tensor:
        """[1, 5, h, w]: the mask (1 = repaint; everything without a mask) and the masked image's latent."""
        H, W = self.init_image.size[1], self.init_image.size[0]
        m = torch.ones(1, 1, H, W)
        if self.mask is not None:
            m = (torch.from_numpy(np.asarray(self.mask, dtype=np.float32) / 255.0)[None, None] >= 0.5).float()
        masked = to_tensor(self.init_image) * (1.0 - m)
        with torch.no_grad(), self._autocast():
            posterior = self.model.encode_first_stage(masked.to(self.device, self.dtype))
        latent = self.model.scale_factor * posterior.mean.float()
        return torch.cat([F.interpolate(m, size=latent_size).to(self.device), latent], dim=1)

    def _eps_model(self, x, t, context, y=None):
        if self._concat is None:
            return super()._eps_model(x, t, context, y)  # y: SDXL's vector conditioning
        cc = self._concat.expand(x.shape[0], -1, -1, -1).to(self.dtype)
        return self.model.apply_model(x.to(self.dtype), t, context.to(self.dtype), c_concat=cc).float()

    def settings(self, item: WorkItem, opts: Options) -> dict:
        s = super().settings(item, opts)
        if self.mask is not None:
            s["Mask blur"] = self.mask_blur
        return s

    def _keep(self, latent_size) -> torch.Tensor:
        """[1, 1, h, w] in [0, 1]: 1 where the latent stays the init image's."""
        m = torch.from_numpy(np.asarray(self.mask, dtype=np.float32) / 255.0)[None, None]
        return 1.0 - F.interpolate(m, size=latent_size, mode="bilinear", align_corners=False).to(self.device)

    def posterior(self):
        """The autoencoder's posterior over the init image's latent (computed once per init image)."""
        if self.init_image is None:
            raise ValueError("no init image: call set_init_image first")
        if self._posterior is None:
            with torch.no_grad(), self._autocast():
                self._posterior = self.model.encode_first_stage(to_tensor(self.init_image).to(self.device, self.dtype))
        return self._posterior

    def sample(self, items: list[WorkItem], opts: Options, callback=None) -> torch.Tensor:
        W, H = self.init_image.size if self.init_image is not None else (None, None)
        if (opts.H, opts.W) != (H, W):
            raise ValueError(f"the run's size {opts.W}x{opts.H} is not the init image's ({W}x{H})")
        if self.inpainting:
            self._concat = self.inpaint_concat(opts.latent_shape()[1:])
            if _strength(opts) == 1:  # the original inpainting scripts: from pure noise
                return Txt2Img.sample(self, items, opts, callback)
        posterior = self.posterior()
        noise, z0 = zip(*(item_noise(self.model, posterior, item.seed, opts.latent_shape()) for item in items))
        z0 = torch.stack(z0).to(self.device, torch.float32)
        keep = self._keep(opts.latent_shape()[1:]) if self.mask is not None and not self.inpainting else None
        return denoise_from(self, items, opts, z0, torch.stack(noise).to(self.device), opts.steps, _strength(opts),
                            callback, keep)

    def generate_batch(self, items, opts, callback=None) -> list[Result]:
        results = super().generate_batch(items, opts, callback)
        if self.mask is not None:  # the unmasked pixels exactly as they were (not on a safety replacement)
            for r in results:
                if not r.nsfw:
                    r.image = Image.composite(r.image, self.init_image, self.mask)
        return results

    def steps_per_run(self, opts: Options) -> int:
        return steps_run(opts.steps, _strength(opts))

    def __call__(self, init_image, prompt="", negative_prompt="", *, strength=0.75, sampler="ddim", steps=50,
                 scale=5.0, eta=None, seed=42, n_samples=1, n_iter=1, fixed_code=False, emphasis=True,
                 batched=False, callback=None, mask=None, mask_blur=4) -> list[Result]:
        """img2img of `init_image` (a PIL image, resized as `fit_size` says): n_iter x n_samples images of
        `prompt` (a string, or a list as --from-file), each from its own seed; only where `mask` (a PIL
        image) is white when it is given."""
        for note in (self.set_init_image(init_image), self.set_mask(mask, mask_blur) if mask is not None else None):
            if note:
                log.warning(note)
        W, H = self.init_image.size
        opts = Options(sampler, steps, scale, eta, H, W, emphasis=emphasis, batched=batched, strength=strength)
        opts.validate(self.model)
        check_counts(n_samples, n_iter)
        batches = prompt_batches(prompt, negative_prompt, n_samples, repeat=isinstance(prompt, str))
        results = []
        for items in plan_work(batches, n_iter, seed, fixed_code):
            results += self.generate_batch(items, opts, callback)
        return results


def _strength(opts: Options) -> float:
    return 0.75 if opts.strength is None else opts.strength


# ----------------------------------------------------------------------------- hires fix


def hires_size(opts: Options, multiple: int) -> tuple[int, int]:
    """(H, W) of the second pass: S times the first pass, rounded down to `multiple` (the model's)."""
    H, W = (int(side * opts.hr_scale) // multiple * multiple for side in (opts.H, opts.W))
    return max(H, multiple), max(W, multiple)


def upscale_latent(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The web UI's "Latent" upscaler: bilinear interpolation of the latent [B, C, h, w] to `size`."""
    return F.interpolate(z.float(), size=size, mode="bilinear", align_corners=False)


def hires_pass(pipe: Txt2Img, items: list[WorkItem], opts: Options, z: torch.Tensor, callback=None) -> torch.Tensor:
    """The hires fix's second pass over the first pass's latents z [B, C, h, w] of `items`: upscaled
    (`opts.hr_upscaler`), then img2img at `opts.hr_strength` over `opts.hr_steps` (default: opts.steps)
    steps at the larger size. Returns the final latents; the callback's step index continues after the
    first pass's. At hr_strength 0 no step runs: the latent upscaler gives the upscaled first pass exactly,
    lanczos the resized picture through one more autoencoder round trip."""
    f = latent_factor(pipe.model)
    H, W = hires_size(opts, f * pipe.model.model.diffusion_model.downsample_factor)
    shape = (z.shape[1], H // f, W // f)
    if opts.hr_upscaler == "latent":
        z0 = upscale_latent(z, shape[1:])
        noise = [torch.randn(list(shape), generator=torch.Generator("cpu").manual_seed(it.seed)) for it in items]
    else:
        noise, z0 = [], []
        for j, item in enumerate(items):
            picture = pipe.decode(z[j:j + 1])[0].resize((W, H), resample=Image.LANCZOS)
            posterior = pipe.model.encode_first_stage(to_tensor(picture).to(pipe.device, pipe.dtype))
            n, z_j = item_noise(pipe.model, posterior, item.seed, shape)
            noise.append(n)
            z0.append(z_j)
        z0 = torch.stack(z0)
    steps = opts.hr_steps or opts.steps
    second = replace(opts, H=H, W=W, steps=steps)
    offset = opts.steps

    def step(i, x_t, x0_pred):
        if callback is not None:
            callback(offset + i, x_t, x0_pred)

    return denoise_from(pipe, items, second, z0.to(pipe.device, torch.float32), torch.stack(noise).to(pipe.device),
                        steps, opts.hr_strength, step)


def hires_steps_run(opts: Options) -> int:
    """The second pass's sampler steps."""
    return steps_run(opts.hr_steps or opts.steps, opts.hr_strength)
