"""Farmer: pixels <-> patch tokens <-> flow latents <-> AR prior, with the exact log-likelihood (docs/method.md §1, §5).

    −log p(x) = −Σ_i log p(z_i^I | z_{<i}^I, c) − Σ_i log p(z_i^R | Z^I, c) − Σ_t log|det ∂Z^t/∂Z^{t−1}|
    loss      = −log p(x) / (N·d)      (nats per dimension, averaged over the batch)
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from farmer.channels import dct_basis
from farmer.config import FarmerConfig
from farmer.dequantization import VariationalDequantizer
from farmer.flow import AutoregressiveFlow, DistilledInverse, auto_inverse
from farmer.guidance import Guidance
from farmer.hub import push_directory
from farmer.nn import Transformer
from farmer.pretrained import (
    checkpoint_directory,
    load_state_into,
    load_weights,
    read_step_config,
    weights_file,
    write_pretrained,
)
from farmer.pretransform import logit_forward, logit_inverse
from farmer.prior import ARPrior, StandardNormalPrior


class LikelihoodTerms(NamedTuple):
    """log p(x) split per patch (each (B, N), nats, row-major patch order): the AR prior's factor of the
    informative channels, its factor of the redundant channels, and the flow's log-det attributed to the patch
    (:meth:`farmer.flow.AutoregressiveFlow.forward_tokens`) with the logit pre-transform's of its pixels, if any."""

    informative: Tensor
    redundant: Tensor
    flow_logdet: Tensor

    def total(self) -> Tensor:
        """log p(x) per image (B,)."""
        return (self.informative + self.redundant + self.flow_logdet).sum(dim=1)


def check_weight_dtype(dtype: torch.dtype) -> None:
    """Weights are fp32 or fp64: the flow's affine maps and log-dets and the mixture densities run in at least fp32
    (docs/method.md §12), so bf16/fp16 weights would only be cast up again, or clash with fp32 activations."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"farmer models keep float32 (or float64) weights, got {dtype}; for bf16 speed keep them in "
                        "float32 and sample or score under bf16 autocast: precision='bf16' "
                        "(farmer.precision.autocast, `--precision bf16`)")


class Farmer(nn.Module):
    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        self.config = config
        self.flow = AutoregressiveFlow(config)
        self.prior = ARPrior(config) if config.prior == "ar" else StandardNormalPrior(config)
        # The one-step student of docs/method.md §7 lives with the model so one checkpoint samples either way.
        self.student = DistilledInverse(config) if config.distilled_inverse else None
        # Learned dequantisation q(u | x) (docs/method.md §14), trained with the model; only the loss uses it.
        self.dequantizer = VariationalDequantizer(config) if config.dequantization == "variational" else None
        # Fixed orthonormal patch transform (log-det 0); a function of the config, so not saved with weights. Built
        # in the model's dtype (the default dtype, then whatever the model is cast to: _apply).
        basis = dct_basis(config.patch_size, config.channels) if config.patch_transform == "dct" else None
        self.register_buffer("patch_basis", None if basis is None else basis.to(torch.get_default_dtype()),
                             persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Farmer:
        """nn.Module's casts and moves (``.to``, ``.double()``, …), then the DCT basis rebuilt from its fp64
        definition in its new dtype: a basis cast up from fp32 would keep fp32's rounding, and an fp64 model's
        transform would be orthonormal only to fp32 accuracy."""
        super()._apply(fn, recurse)
        if self.patch_basis is not None and self.patch_basis.device.type != "meta":
            self.patch_basis = dct_basis(self.config.patch_size, self.config.channels).to(self.patch_basis)
        return self

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None, ema: bool = True,
                        map_location: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                        local_files_only: bool = False, expected: FarmerConfig | None = None,
                        torch_dtype: torch.dtype = torch.float32) -> Farmer:
        """A model, in eval mode, from a checkpoint directory (released, step or run directory), a shipped
        model's name (e.g. "mnist") or a Hugging Face Hub repository id ("owner/name", needs the ``hub``
        extra; ``revision``, ``cache_dir`` and ``local_files_only`` are passed on). EMA weights when present.
        With ``expected`` the stored config must equal it; the error lists the fields that differ.
        ``torch_dtype``: float32 or float64 weights; bf16 computation is a precision policy, not a weight dtype
        (``with farmer.precision.autocast(device, torch.bfloat16)``, docs/method.md §12)."""
        check_weight_dtype(torch_dtype)
        step_dir = checkpoint_directory(path_or_repo_id, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_files_only)
        config = read_step_config(step_dir)[1]
        if expected is not None and config != expected:
            raise ValueError(f"checkpoint config does not match: {config.diff(expected)} (checkpoint, expected)")
        model = cls(config)
        file = weights_file(step_dir, ema)
        load_state_into(model, load_weights(file), file)
        return model.to(map_location, torch_dtype).eval()

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None,
                        id2label: Sequence[str] | None = None) -> Path:
        """Write this model as ``directory/config.json`` + ``directory/model.safetensors`` (the Hub layout),
        the weights in ``dtype`` when given (e.g. torch.float16, as the shipped models are stored), and the
        class names ``id2label`` (in class order) in config.json when given."""
        return write_pretrained(directory, self.config, self.state_dict(), dtype,
                                None if id2label is None else list(id2label))

    def push_to_hub(self, repo_id: str, *, id2label: Sequence[str] | None = None, dtype: torch.dtype | None = None,
                    token: str | None = None, private: bool = False, revision: str | None = None,
                    commit_message: str = "Upload FARMER model") -> str:
        """:meth:`save_pretrained` to the Hugging Face Hub repository ``repo_id`` (created if missing; needs the
        ``hub`` extra), with a generated README.md model card; returns the commit's URL. To share a trained
        checkpoint with its steps and metrics.json, use :func:`farmer.hub.push_directory` on its directory."""
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory, dtype, id2label)
            return push_directory(directory, repo_id, token=token, private=private, revision=revision,
                                  commit_message=commit_message)

    def weight_dtype(self) -> torch.dtype:
        """The weights' dtype, checked: fp32 or fp64 (:func:`check_weight_dtype`)."""
        dtype = next(self.parameters()).dtype
        check_weight_dtype(dtype)
        return dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def attach_student(self, student: DistilledInverse) -> Farmer:
        """Attach a one-step student of the flow inverse (docs/method.md §7), replacing any, and set
        ``config.distilled_inverse`` so checkpoints and ``inverse="distilled"`` agree with the weights.
        :func:`farmer.distill.attach_new_student` builds one from this model's flow (Algorithm 2's start)."""
        if len(student.blocks) != len(self.flow.blocks):
            raise ValueError(f"the student has {len(student.blocks)} blocks, the flow {len(self.flow.blocks)}")
        self.student = student
        self.config = self.config.replace(distilled_inverse=True)
        return self

    def set_activation_checkpointing(self, enabled: bool) -> Farmer:
        """Recompute every transformer layer (flow blocks, AR prior, student) in the backward pass instead of
        holding its activations (:class:`farmer.nn.Transformer`): a training switch, not part of the config."""
        for module in self.modules():
            if isinstance(module, Transformer):
                module.activation_checkpointing = enabled
        return self


    # Pixels <-> tokens -------------------------------------------------------------------------------
    def to_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) -> (Z^0 (B, N, d), log|det ∂Z^0/∂x| of each patch (B, N)): the logit pre-transform
        when the config has one (docs/method.md §13), then :meth:`patchify` (orthonormal: log-det 0)."""
        if not self.config.logit_alpha:
            return self.patchify(x), x.new_zeros(x.shape[0], self.config.num_tokens)
        y, logdet = logit_forward(x, self.config.logit_alpha)
        return self.patchify(y), self._patches(logdet).sum(dim=2)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """Z^0 -> images: the inverse of :meth:`to_tokens`."""
        x = self.unpatchify(tokens)
        return logit_inverse(x, self.config.logit_alpha) if self.config.logit_alpha else x

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, d): row-major patches, channels ordered (row-in-patch, col-in-patch, C),
        then the config's patch transform (DCT coefficients in zig-zag order, or the raw pixels)."""
        self.check_images(x, check_range=False)
        tokens = self._patches(x)
        if self.patch_basis is None:
            return tokens
        return tokens @ self.patch_basis.to(tokens.dtype).T

    def _patches(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, d), the raw patch layout of :meth:`patchify`."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.num_tokens, cfg.token_dim)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens must have shape (B, {expected[0]}, {expected[1]}), got {tuple(tokens.shape)}")
        if self.patch_basis is not None:  # orthonormal: the inverse is the transpose
            tokens = tokens @ self.patch_basis.to(tokens.dtype)
        b, p, c = tokens.shape[0], cfg.patch_size, cfg.channels
        side = cfg.image_size // p
        x = tokens.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, cfg.image_size, cfg.image_size)

    # Input checks -------------------------------------------------------------------------------------
    def check_images(self, x: Tensor, check_range: bool = True) -> None:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got dtype {x.dtype} "
                            "(convert uint8 pixels with farmer.pixels.pixels_to_model)")
        # Value checks sync with the device, so only the public entry points make them; training feeds
        # dequantize()'s output, bounded by construction (its Gaussian noise may leave [-1, 1] on purpose).
        if check_range and x.numel():
            if not torch.isfinite(x).all():
                raise ValueError("images contain NaN or Inf")
            # The likelihood is of data in [-1, 1]; the tolerance only absorbs rounding in a caller's scaling.
            tolerance = 1e-3
            if x.min() < -1 - tolerance or x.max() > 1 + tolerance:
                raise ValueError(f"images must lie in [-1, 1] (uint8 k -> (k + u)/128 - 1), got values in "
                                 f"[{x.min():.3g}, {x.max():.3g}]")

    def check_labels(self, y: Tensor | None, batch: int, device: torch.device, check_values: bool = True) -> Tensor:
        """Labels (B,) as long; None means the null class (unconditional). ``check_values=False`` skips the
        range check, which syncs with the device."""
        cfg = self.config
        if y is None:
            return torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device)
        if not cfg.conditional:
            raise ValueError("this model is unconditional (num_classes=0) but labels were given")
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:  # a bool mask is no class index
            raise TypeError(f"labels must be integers (class indices), got dtype {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(y.shape)}")
        if check_values and batch and (y.min() < 0 or y.max() >= cfg.num_classes):
            raise ValueError(f"labels must be in [0, {cfg.num_classes - 1}], got [{y.min()}, {y.max()}]")
        return y.long()

    # Likelihood -------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images -> (Z^I (B, N, d_I), Z^R (B, N, d_R), log-det (B,) of the map to them: flow and pre-transform)
        in the prior's token order."""
        tokens, pre_logdet = self.to_tokens(x)
        z, logdet = self.flow(tokens)
        if self.config.final_permute:  # docs/method.md §1 step 4: reverse the token order
            z = z.flip(1)
        d_i = self.config.informative_dim
        return z[..., :d_i], z[..., d_i:], logdet + pre_logdet.sum(dim=1)

    def decode(self, informative: Tensor, redundant: Tensor,
               inverse: Literal["auto", "exact", "jacobi", "distilled"] = "auto") -> Tensor:
        """(Z^I, Z^R) -> images: concatenate, undo the final permute, invert the flow, unpatchify. "auto": the
        exact or the Jacobi inverse, whichever is faster at this batch size on this device (docs/method.md §7)."""
        z = torch.cat([informative, redundant], dim=-1)
        if self.config.final_permute:
            z = z.flip(1)
        if inverse == "auto":
            inverse = auto_inverse(z.shape[0], z.device)
        if inverse == "exact":
            tokens = self.flow.inverse(z)
        elif inverse == "jacobi":
            tokens, _ = self.flow.jacobi_inverse(z)
        elif inverse == "distilled":
            if self.student is None:
                raise ValueError("this model has no distilled inverse; train one with `farmer distill`")
            tokens = self.student(z)
        else:
            raise ValueError(f"inverse must be 'auto', 'exact', 'jacobi' or 'distilled', got {inverse!r}")
        return self.from_tokens(tokens)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x | y) per image (B,), in nats, of images x in [-1, 1] (any float dtype, cast to the model's);
        y=None is the null class. An empty batch gives an empty result."""
        self.check_images(x)
        labels = self.check_labels(y, x.shape[0], x.device)
        x = x.to(self.weight_dtype())
        if not x.shape[0]:
            return x.new_empty(0)
        return self._log_prob(x, labels)

    @torch.no_grad()
    def log_prob_terms(self, x: Tensor, y: Tensor | None = None) -> LikelihoodTerms:
        """The terms of log p(x | y) (module docstring) per patch, each (B, N) in nats with patches in row-major
        image order: they sum to :meth:`log_prob`. Where the bits of a likelihood go (``farmer eval bpd
        --breakdown``)."""
        self.check_images(x)
        labels = self.check_labels(y, x.shape[0], x.device)
        x = x.to(next(self.parameters()).dtype)
        tokens, pre_logdet = self.to_tokens(x)
        z, flow = self.flow.forward_tokens(tokens)
        if self.config.final_permute:
            z = z.flip(1)
        d_i = self.config.informative_dim
        informative, redundant = self.prior.token_log_probs(z[..., :d_i], z[..., d_i:], labels)
        if self.config.final_permute:  # back from the prior's token order to the patches'
            informative, redundant = informative.flip(1), redundant.flip(1)
        return LikelihoodTerms(informative, redundant, flow + pre_logdet)

    def _log_prob(self, x: Tensor, labels: Tensor) -> Tensor:
        informative, redundant, logdet = self.encode(x)
        return self.prior.log_prob(informative, redundant, labels) + logdet

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loss in nats per dimension, per-image NLL in nats (B,)). In training mode labels are dropped to
        the null class with probability ``label_dropout`` so one model is also unconditional (docs/method.md §4).
        With variational dequantisation x holds the pixels' bin centres, and the NLL is that of the variational
        bound, −(log p(x₀ + u/128) − log q(u | x)) with u ~ q (docs/method.md §14)."""
        cfg = self.config
        # The training hot path: shape and dtype checks only (no device sync); log_prob checks values.
        self.check_images(x, check_range=False)
        if not x.shape[0]:
            raise ValueError("images is an empty batch; the loss needs at least one image")
        labels = self.check_labels(y, x.shape[0], x.device, check_values=False)
        if self.training and cfg.conditional and cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < cfg.label_dropout
            labels = labels.masked_fill(drop, cfg.num_classes)
        if self.dequantizer is None:
            nll = -self._log_prob(x, labels)
        else:
            dequantized, log_q = self.dequantizer(x)
            nll = log_q - self._log_prob(dequantized, labels)
        return nll.mean() / cfg.num_dims, nll

    # Sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None, *,
               guidance: Guidance | None = None, variance_scale: float = 1.0, temperature: float = 1.0,
               inverse: Literal["auto", "exact", "jacobi", "distilled"] = "auto",
               progress: Callable[[int], None] | None = None) -> Tensor:
        """n images (n, C, H, W) in [-1, 1]: AR over Z^I (optionally guided), Z^R from the shared mixture,
        then the flow inverse (exact and sequential, Jacobi-iterated, or the distilled student)."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"sample(n, ...): n is the number of images, an int, got {type(n).__name__} {n!r} "
                            "(a guidance scale goes in guidance=ResamplingGuidance(scale=...))")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for name, value in (("variance_scale", variance_scale), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if guidance is not None and not isinstance(guidance, Guidance):
            raise TypeError(f"guidance is a CFG method, e.g. ResamplingGuidance(scale=2.5), got "
                            f"{type(guidance).__name__} {guidance!r}")
        self.weight_dtype()
        labels = self.check_labels(y, n, self.device)
        if guidance is not None and not self.config.conditional:
            raise ValueError("guidance needs a class-conditional model")
        informative, redundant = self.prior.sample(labels, generator, guidance, variance_scale, temperature,
                                                   progress)
        return self.decode(informative, redundant, inverse).clamp(-1, 1)
