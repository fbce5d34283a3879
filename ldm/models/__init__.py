"""The models of Stable Diffusion v1: UNet, KL autoencoder, CLIP text encoder, latent diffusion wrapper."""
