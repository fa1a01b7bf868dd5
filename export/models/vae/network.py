"""A small fully-convolutional VAE for native-resolution tiles (the study's dense VAE over 768x768
flattened pixels does not fit an edge device; this keeps the study's localization recipe)."""

from __future__ import annotations

import mxnet as mx
from mxnet.gluon import HybridBlock, nn


def _down(channels: int) -> nn.HybridSequential:
    block = nn.HybridSequential()
    block.add(nn.Conv2D(channels, 4, strides=2, padding=1, use_bias=False), nn.BatchNorm(), nn.LeakyReLU(0.1))
    return block


def _up(channels: int) -> nn.HybridSequential:
    block = nn.HybridSequential()
    block.add(
        nn.Conv2DTranspose(channels, 4, strides=2, padding=1, use_bias=False),
        nn.BatchNorm(),
        nn.LeakyReLU(0.1),
    )
    return block


class ConvVAE(HybridBlock):
    """Encoder 4x stride-2 -> spatial latent (mu, logvar) at 1/16 -> mirrored decoder -> sigmoid.

    `hybrid_forward` returns (reconstruction, mu, logvar); in inference the decoder reads mu, so the
    exported graph is deterministic. The input is the normalised tile, the output is in windowed
    [0, 1] units, which is what the anomaly map compares against.
    """

    def __init__(self, latent_channels: int = 8, width: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latent_channels = latent_channels
        with self.name_scope():
            self.encoder = nn.HybridSequential()
            for c in (width, width * 2, width * 4, width * 4):
                self.encoder.add(_down(c))
            self.to_mu = nn.Conv2D(latent_channels, 1)
            self.to_logvar = nn.Conv2D(latent_channels, 1)
            self.decoder = nn.HybridSequential()
            for c in (width * 4, width * 2, width, width):
                self.decoder.add(_up(c))
            self.decoder.add(nn.Conv2D(1, 3, padding=1))

    def hybrid_forward(self, F, x, eps=None):
        h = self.encoder(x)
        mu = self.to_mu(h)
        logvar = F.clip(self.to_logvar(h), -8.0, 8.0)
        z = mu if eps is None else mu + F.exp(0.5 * logvar) * eps
        recon = F.sigmoid(self.decoder(z))
        return recon, mu, logvar


class VAEExport(HybridBlock):
    """Inference view of the VAE for ONNX: input tile -> reconstruction from mu."""

    def __init__(self, vae: ConvVAE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vae = vae

    def hybrid_forward(self, F, x):
        h = self.vae.encoder(x)
        return F.sigmoid(self.vae.decoder(self.vae.to_mu(h)))


def vae_loss(recon: mx.nd.NDArray, target: mx.nd.NDArray, mu, logvar, beta: float) -> mx.nd.NDArray:
    """Per-sample loss: pixel MSE (summed) + beta * KL(q(z|x) || N(0, 1)) (summed)."""
    rec = ((recon - target) ** 2).sum(axis=(1, 2, 3))
    kl = -0.5 * (1 + logvar - mu**2 - mx.nd.exp(logvar)).sum(axis=(1, 2, 3))
    return rec + beta * kl
