"""The four transforms of LALIC (paper Sec. 3.1, Fig. 2): g_a, g_s, h_a and h_s.

Strided (transposed) convolutions change resolution; Bi-RWKV stages between them are the only
non-linearities (no GDN, no ReLU between stages). Maps stay channels-last throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import transform_kernels
from model.layers import BlockStage, exporting_onnx


def subpixel_kernel(weight: Tensor, bias: Tensor | None, padding: int) -> tuple[Tensor, Tensor, list[int]]:
    """The sub-pixel form of a stride-2 transposed convolution with output padding 1 (see
    :class:`ConvTranspose2d`): the kernel ``(4 * out, in, size, size)``, its bias and the input
    padding ``[left, right, top, bottom]`` of the equivalent convolution followed by
    ``pixel_shuffle(2)``."""
    k, p = weight.shape[-1], padding
    cin, cout = weight.shape[:2]
    offsets = [(a + p - t) // 2 for a in (0, 1) for t in range(k) if (a + p - t) % 2 == 0]
    lo, hi = min(offsets), max(offsets)
    size = hi - lo + 1
    # (out channel, row phase, column phase, in channel, kernel row, kernel column)
    w = weight.new_zeros(cout, 2, 2, cin, size, size)
    for a in (0, 1):
        for t in range(k):
            if (a + p - t) % 2:
                continue
            for b in (0, 1):
                for s in range(k):
                    if (b + p - s) % 2:
                        continue
                    row, col = (a + p - t) // 2 - lo, (b + p - s) // 2 - lo
                    w[:, a, b, :, row, col] += weight[:, :, t, s].t()
    full_bias = bias if bias is not None else weight.new_zeros(cout)
    return w.reshape(4 * cout, cin, size, size), full_bias.repeat_interleave(4), [-lo, hi, -lo, hi]


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters and state dict) with inference-only fast forms.

    In no-grad execution the input is made channels-last first (oneDNN's transposed convolution
    was 2-3x faster on channels-last maps here). :meth:`use_subpixel` switches to the exact
    sub-pixel form (Shi et al., "Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel CNN", CVPR 2016): a stride-2 transposed convolution with kernel k,
    padding k // 2 and output padding 1 equals an ordinary convolution of the input with a
    ``ceil(k / 2)``-tap kernel producing ``4 * out_channels`` channels, then ``pixel_shuffle(2)``.
    Output pixel ``2m + a`` receives input ``i`` through tap ``t`` when ``2i + t - k // 2 = 2m + a``,
    i.e. from input offset ``(a + k // 2 - t) / 2``; each phase's taps are gathered into the
    phase's output channels. The result equals the transposed convolution up to float rounding.

    :meth:`use_fused_kernel` then runs that convolution and the pixel shuffle as one CPU kernel
    (:func:`model.transform_kernels.subpixel_conv`; g_s's last layer, issue 39), which also reads a
    bfloat16 map directly (g_s's body under precision bfloat16, multiplied in bfloat16 pairs with
    float32 sums where the CPU has AVX512-BF16). Otherwise a map of another dtype than the weights
    is converted first.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("subpixel_weight", None, persistent=False)
        self.register_buffer("subpixel_bias", None, persistent=False)
        self.register_buffer("subpixel_packed", None, persistent=False)
        self.subpixel_pad: list[int] = [0, 0, 0, 0]

    @torch.no_grad()
    def use_subpixel(self) -> None:
        """Precompute the sub-pixel kernel (stride 2, square kernel, output padding 1 only)."""
        k = self.kernel_size[0]
        square = self.kernel_size == (k, k)
        if self.stride != (2, 2) or self.output_padding != (1, 1) or self.groups != 1 or not square:
            raise ValueError("sub-pixel form implemented for stride 2, output padding 1, square kernels")
        weight, bias, pad = subpixel_kernel(self.weight, self.bias, self.padding[0])
        self.subpixel_weight = weight.contiguous(memory_format=torch.channels_last)
        self.subpixel_bias = bias
        self.subpixel_pad = pad
        self.subpixel_packed = None  # a fused kernel's packing of earlier weights must not survive

    @torch.no_grad()
    def use_fused_kernel(self) -> None:
        """Run the sub-pixel form on :func:`model.transform_kernels.subpixel_conv` (inference on the
        CPU); a layer without a square 'same' sub-pixel kernel (odd size, equal padding) keeps
        PyTorch's convolution."""
        weight, pad = self.subpixel_weight, self.subpixel_pad
        if weight is None or weight.shape[0] > transform_kernels.SUBPIXEL_MAX_OUTPUTS:
            return
        if weight.shape[-1] > transform_kernels.SUBPIXEL_MAX_SIZE:
            return
        if pad[0] == pad[1] == pad[2] == pad[3] and weight.shape[-1] == 2 * pad[0] + 1:
            self.subpixel_packed = transform_kernels.pack_subpixel_weight(weight)

    def forward(self, x: Tensor) -> Tensor:
        sub_w, sub_b, packed = self.subpixel_weight, self.subpixel_bias, self.subpixel_packed
        if packed is not None and sub_b is not None and not torch.is_grad_enabled() and not exporting_onnx():
            return torch.ops.lalic.subpixel_conv(x, packed, sub_b, True)
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        if sub_w is not None and sub_b is not None:
            pad = self.subpixel_pad
            if pad[0] == pad[1] == pad[2] == pad[3]:  # the convolution pads (no padded copy of x)
                return F.pixel_shuffle(F.conv2d(x, sub_w, sub_b, padding=pad[0]), 2)
            return F.pixel_shuffle(F.conv2d(F.pad(x, pad), sub_w, sub_b), 2)
        if not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )


def conv(cin: int, cout: int, kernel: int, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int, stride: int = 2) -> ConvTranspose2d:
    return ConvTranspose2d(cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1)


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
