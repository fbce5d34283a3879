"""Classifier-free guidance as a wrapper turning eps_model(x, t, cond) into the samplers' model_fn(x, t).

The model may predict v instead of eps: v and eps are affine in each other with the same x_t for both
branches, so guiding v then converting equals converting then guiding (diffusers and Stability guide v).
"""

import torch


def cfg_denoiser(eps_model, cond: torch.Tensor, uncond: torch.Tensor | None = None, scale: float = 1.0,
                 fans_out: bool = False):
    """Classifier-free guidance, eps_u + scale * (eps_c - eps_u), in one batched pass (Ho & Salimans 2022, arXiv:2207.12598).

    `uncond` is the embedding of the empty prompt, or of a negative prompt; a batch of 1 is repeated to
    match `cond`. At scale 1 the unconditional branch is skipped: one pass of batch B per evaluation.
    `fans_out`: eps_model takes the B latents once with the 2B contexts and denoises each latent under
    both (as `UNetModel` does); otherwise the latents are repeated to 2B.
    """
    if scale == 1.0:
        return lambda x, t: eps_model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional embedding")
    if uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    context = torch.cat([uncond, cond])  # (2B, L, D): unconditional half first

    def eps_fn(x, t):
        if fans_out:
            eps_u, eps_c = eps_model(x, t, context).chunk(2)
        else:
            eps_u, eps_c = eps_model(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn
