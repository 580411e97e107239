"""The four transforms of LALIC (paper Sec. 3.1, Fig. 2): g_a, g_s, h_a and h_s.

Strided (transposed) convolutions change resolution; Bi-RWKV stages between them are the only
non-linearities (no GDN, no ReLU between stages). Maps stay channels-last throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from model.layers import BlockStage


def conv(cin: int, cout: int, kernel: int, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )


def analysis_transform(widths: Sequence[int], depths: Sequence[int], latent: int) -> nn.Sequential:
    """g_a: x (3 ch) -> y (``latent`` ch) at 1/16 resolution: Conv k5, then k3 convs between stages."""
    layers: list[nn.Module] = [conv(3, widths[0], 5)]
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        layers.append(BlockStage(width, depth))
        nxt = widths[i + 1] if i + 1 < len(widths) else latent
        layers.append(conv(width, nxt, 3))
    return nn.Sequential(*layers)


def synthesis_transform(widths: Sequence[int], depths: Sequence[int], latent: int) -> nn.Sequential:
    """g_s: the mirror of g_a with transposed convolutions; the last one (k5) outputs RGB."""
    rev_w, rev_d = list(widths)[::-1], list(depths)[::-1]
    layers: list[nn.Module] = [deconv(latent, rev_w[0], 3)]
    for i, (width, depth) in enumerate(zip(rev_w, rev_d, strict=True)):
        layers.append(BlockStage(width, depth))
        if i + 1 < len(rev_w):
            layers.append(deconv(width, rev_w[i + 1], 3))
    layers.append(deconv(rev_w[-1], 3, 5))
    return nn.Sequential(*layers)


def hyper_analysis(latent: int, width: int, depth: int, hyper_latent: int) -> nn.Sequential:
    """h_a: y -> z at 1/64 resolution: Conv k5 s2, Bi-RWKV stage, Conv k5 s2."""
    return nn.Sequential(conv(latent, width, 5), BlockStage(width, depth), conv(width, hyper_latent, 5))


def hyper_synthesis(hyper_latent: int, width: int, depth: int, out: int) -> nn.Sequential:
    """h_s: z_hat -> hyper parameters at 1/16 resolution (no output activation)."""
    return nn.Sequential(deconv(hyper_latent, width, 5), BlockStage(width, depth), deconv(width, out, 5))
