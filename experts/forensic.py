"""Forensic-statistics expert: fixed residual, colour and spectrum statistics pooled over a
grid of face regions, and a small MLP on top.

The oldest detectors of manipulated faces do not learn their filters: steganalysis rich
models (Fridrich & Kodovsky 2012; the "steganalysis features + SVM" baseline of the
FaceForensics++ paper) and spectrum profiles (Durall et al. 2020) measure how noise,
sharpness and colour are distributed. A swapped or re-rendered face changes them *inside*
the face and not outside, so the statistics are pooled over a `grid` x `grid` layout of the
(centred, aligned) face crop and the head compares regions. Nothing but the head is trained:
it learns in a few epochs from a few thousand images, where a CNN from scratch needs many,
and it fails differently from the CNNs, which is what an ensemble wants.

Features per image (all fixed, computed on the device):
  residuals  log mean |r| per grid cell for 6 high-pass maps of the grey image (3 SRM
             kernels, Laplacian, horizontal and vertical second differences)
  colour     mean and std of Y, Cb, Cr per grid cell, and minus the image's mean
  spectrum   radial profile of the log power spectrum of the central half (16 bins)
  blocks     mean |first difference| at each of the 8 column and row phases, normalised
             (JPEG 8x8 grid traces: a face pasted into a compressed frame breaks them)
With `relative: true` only contrasts remain: each cell's log residual and log colour spread
minus the crop's mean, the relative colour means, the spectrum's shape and the block phases.
Nothing then depends on the overall brightness, noise or compression level of the source.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from configs import ConfigError, ExpertConfig
from experts.base import FixedStatistics, FixedStatisticsClassifier, NoiseResiduals, register_expert

SPECTRUM_BINS = 16


class ForensicStatistics(FixedStatistics):
    """(B, 3, H, W) in [0, 1] -> (B, n_features) fixed statistics; no parameters."""

    def __init__(self, grid: int, relative: bool = False):
        super().__init__()
        self.grid, self.relative = grid, relative
        self.srm = NoiseResiduals()
        extra = torch.zeros(3, 1, 3, 3)
        extra[0, 0] = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]])   # Laplacian
        extra[1, 0, 1] = torch.tensor([1, -2, 1])                        # horizontal 2nd difference
        extra[2, 0, :, 1] = torch.tensor([1, -2, 1])                     # vertical 2nd difference
        self.register_buffer("extra", extra)
        ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
        self.register_buffer("ycbcr", ycbcr)
        self._spectrum_operators: dict = {}  # (h, w, device) -> fixed matrices, built once per size

    def spectrum_operators(self, h: int, w: int, device) -> tuple[torch.Tensor, ...]:
        """The fixed matrices behind the radial profile of an h x w centred power spectrum:
        the DFT along the rows and along the columns (`dft_matrix`), a mask that is 0 at the
        zero frequency only, and the (h * w, bins) matrix that averages the pixels of each
        radial bin (the corners beyond the inscribed circle belong to none)."""
        key = (h, w, str(device))
        if key not in self._spectrum_operators:
            yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
            radius = torch.sqrt(yy.float() ** 2 + xx.float() ** 2) / (min(h, w) / 2)
            bins = (radius * SPECTRUM_BINS).long().clamp_max(SPECTRUM_BINS).flatten()
            in_bin = F.one_hot(bins, SPECTRUM_BINS + 1)[:, :SPECTRUM_BINS].float()
            bin_means = in_bin / in_bin.sum(0).clamp_min(1)
            not_zero_frequency = ((yy != 0) | (xx != 0)).float()
            self._spectrum_operators[key] = tuple(
                t.to(device) for t in (dft_matrix(h), dft_matrix(w), not_zero_frequency, bin_means))
        return self._spectrum_operators[key]

    @property
    def n_features(self) -> int:
        cells = self.grid * self.grid
        return 6 * cells + (2 if self.relative else 3) * 3 * cells + SPECTRUM_BINS + 16

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True) * 255
        residuals = torch.cat([self.srm(x) * 25.5, F.conv2d(grey, self.extra, padding=1)], dim=1).abs()
        res = torch.log1p(F.adaptive_avg_pool2d(residuals, self.grid)).flatten(1)
        colour = torch.einsum("cd,bdhw->bchw", self.ycbcr, x)
        mean = F.adaptive_avg_pool2d(colour, self.grid)
        std = (F.adaptive_avg_pool2d(colour ** 2, self.grid) - mean ** 2).clamp_min(1e-8).sqrt()
        relative = mean - colour.mean(dim=(2, 3), keepdim=True)
        spectrum = self.spectrum(grey[:, 0] / 255)
        if self.relative:
            # Contrasts only: each region against the whole crop (noise, sharpness, colour
            # spread), and the spectrum's shape, not its level. A data set's compression and
            # resolution move every region alike; a pasted face moves one.
            res = res.unflatten(1, (6, -1))
            res = (res - res.mean(2, keepdim=True)).flatten(1)
            log_std = std.log()
            log_std = log_std - log_std.mean(dim=(2, 3), keepdim=True)
            return torch.cat([res, log_std.flatten(1), relative.flatten(1),
                              spectrum - spectrum.mean(1, keepdim=True), self.block_phases(grey[:, 0])], dim=1)
        return torch.cat([res, mean.flatten(1), std.flatten(1), relative.flatten(1),
                          spectrum, self.block_phases(grey[:, 0])], dim=1)

    def spectrum(self, grey: torch.Tensor) -> torch.Tensor:
        """Radial profile of the log power spectrum of the central half, by matrix products
        rather than torch.fft: the same spectrum up to float32 rounding, and a graph that
        exports to ONNX (torch's exporter writes no FFT). The zero frequency is exactly 0
        once the mean is subtracted; computed, it is the rounding noise of that mean (a power
        of 1e-8 to 1e-6 whose log differs from one library to the next), so it is masked."""
        h, w = grey.shape[-2:]
        centre = grey[:, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2]
        centre = centre - centre.mean(dim=(1, 2), keepdim=True)
        n, m = centre.shape[-2:]
        rows_dft, cols_dft, not_zero_frequency, bin_means = self.spectrum_operators(n, m, grey.device)
        # (B, 2n, 2m) = [[C x C', C x S'], [S x C', S x S']] for C, S the cosine and sine halves
        z = rows_dft @ (centre.float() @ cols_dft.T)
        real, imaginary = z[:, :n, :m] - z[:, n:, m:], z[:, :n, m:] + z[:, n:, :m]
        power = ((real ** 2 + imaginary ** 2) * not_zero_frequency).add(1e-8).log()
        return power.flatten(1) @ bin_means

    @staticmethod
    def block_phases(grey: torch.Tensor) -> torch.Tensor:
        h, w = grey.shape[-2:]
        cols = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=1)[:, : (w - 1) // 8 * 8]
        rows = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=2)[:, : (h - 1) // 8 * 8]
        phases = torch.cat([cols.unflatten(1, (-1, 8)).mean(1), rows.unflatten(1, (-1, 8)).mean(1)], dim=1)
        return phases / phases.mean(dim=1, keepdim=True).clamp_min(1e-6)


def dft_matrix(n: int) -> torch.Tensor:
    """(2n, n): the n-point DFT's cosine matrix (its real part) over its sine matrix (minus its
    imaginary part), row k for the frequency k - n // 2, so the zero frequency is the middle
    row, as after fftshift. The phase k * j is reduced modulo n in integers first, so it stays
    exact."""
    frequency = torch.arange(n) - n // 2
    phase = (frequency[:, None] * torch.arange(n)[None, :]) % n
    angle = phase.double() * (2 * math.pi / n)
    return torch.cat([angle.cos(), angle.sin()]).float()


@register_expert("forensic")
class ForensicStatsExpert(FixedStatisticsClassifier):
    config_fields = frozenset({"grid", "relative", "embed_dim"})

    def __init__(self, cfg: ExpertConfig, image_size: int):
        if cfg.grid < 1:
            raise ConfigError(f"forensic expert: grid must be >= 1, got {cfg.grid}")
        super().__init__(cfg, image_size, ForensicStatistics(cfg.grid, cfg.relative))
