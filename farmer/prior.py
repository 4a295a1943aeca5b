"""The AR prior over the flow's latent tokens (docs/method.md §3–4), and the standard-normal baseline.

Input sequence: the class embedding repeated M times (condition repeat), then the projected informative
tokens z_1^I … z_N^I. The state at the last condition slot predicts the mixture G_1 of z_1^I, the state at
z_i^I predicts G_{i+1}, and the state at z_N^I — which has seen all of Z^I — predicts the one shared
mixture of every redundant vector z_i^R (the "(N+1)-th token"):

    P(Z | c) = Π_i P(z_i^I | z_{<i}^I, c) · Π_i P_{N+1}(z_i^R | Z^I, c)

With ``redundant_mixture="per_token"`` the state at z_i^I also predicts a mixture for z_i^R alone
(docs/method.md §11); the likelihood stays exact:

    P(Z | c) = Π_i P(z_i^I | z_{<i}^I, c) · P(z_i^R | z_{≤i}^I, c)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from farmer.config import FarmerConfig
from farmer.guidance import Guidance
from farmer.mixture import LOG_2PI, DiagonalMixture, MixtureHead, decoupled_knobs, gumbel_noise
from farmer.nn import Transformer


class ARPrior(nn.Module):
    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        width = config.prior_width
        self.num_tokens = config.num_tokens
        self.repeat = config.condition_repeat
        self.informative_dim = config.informative_dim
        self.redundant_dim = config.redundant_dim
        self.per_token_redundant = config.redundant_mixture == "per_token"
        # Index num_classes is the learned null class ∅ (label dropout, classifier-free guidance); an
        # unconditional model has only it.
        self.null_class = config.num_classes
        self.class_embed = nn.Embedding(config.num_classes + 1, width)
        self.proj_in = nn.Linear(self.informative_dim, width)
        self.pos = nn.Parameter(torch.randn(self.repeat + self.num_tokens, width) * 0.02)
        self.transformer = Transformer(width, config.prior_layers, config.head_dim, config.mlp_ratio,
                                       self.repeat + self.num_tokens)
        self.informative_head = MixtureHead(width, self.informative_dim, config.informative_components,
                                            config.min_mixture_scale)
        self.redundant_head = (MixtureHead(width, self.redundant_dim, config.redundant_components,
                                           config.min_mixture_scale) if self.redundant_dim else None)

    def _condition(self, labels: Tensor) -> Tensor:
        """The class embedding repeated M times, with positions (docs/method.md §4, "condition repeat")."""
        return self.class_embed(labels)[:, None, :] + self.pos[: self.repeat]

    def forward(self, informative: Tensor, labels: Tensor) -> tuple[DiagonalMixture, DiagonalMixture | None]:
        """Mixtures of every informative token (batch (B, N)) and the redundant mixture: the shared one (batch
        (B,)) or, per token, one for each z_i^R (batch (B, N))."""
        m = self.repeat
        tokens = self.proj_in(informative) + self.pos[m:]
        h = self.transformer(torch.cat([self._condition(labels), tokens], dim=1), causal=True)
        informative_mix = self.informative_head(h[:, m - 1 : m + self.num_tokens - 1])
        if self.redundant_head is None:
            return informative_mix, None
        return informative_mix, self.redundant_head(h[:, m:] if self.per_token_redundant else h[:, -1])

    def log_prob(self, informative: Tensor, redundant: Tensor, labels: Tensor) -> Tensor:
        """log P(Z | c) per image (B,) in nats."""
        log_informative, log_redundant = self.token_log_probs(informative, redundant, labels)
        return log_informative.sum(dim=1) + log_redundant.sum(dim=1)

    def token_log_probs(self, informative: Tensor, redundant: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The factors of log P(Z | c) per token: (log P(z_i^I | z_<i^I, c), log P(z_i^R | ·)), each (B, N) in nats;
        the second is zero where the model has no redundant channels."""
        informative_mix, redundant_mix = self(informative, labels)
        log_informative = informative_mix.log_prob(informative)
        if redundant_mix is None:
            return log_informative, torch.zeros_like(log_informative)
        if self.per_token_redundant:
            return log_informative, redundant_mix.log_prob(redundant)
        # One mixture per image, shared by its N redundant vectors: put tokens on a leading sample dim.
        return log_informative, redundant_mix.log_prob(redundant.transpose(0, 1)).transpose(0, 1)

    def sampling_noise(self, batch: int, generator: torch.Generator | None = None, variance_scale: float = 1.0,
                       temperature: float = 1.0, device: torch.device | str | None = None) -> SamplingNoise:
        """Every random number of one unguided :meth:`sample`, drawn up front in this order (no step of the
        loop draws any). The decoupled knobs of supplementary §7 act on the noise, not on the mixtures:
        argmax(logits/T + G) = argmax(logits + T·G) and √s·σ·ε = σ·(√s·ε) (:meth:`DiagonalMixture.sample_with`)."""
        n = self.num_tokens
        redundant_components = 0 if self.redundant_head is None else self.redundant_head.components
        temperature, std = decoupled_knobs(variance_scale, temperature)
        return SamplingNoise(
            gumbel_noise((n, batch, self.informative_head.components), generator, device) * temperature,
            torch.randn(n, batch, self.informative_dim, generator=generator, device=device) * std,
            gumbel_noise((n, batch, redundant_components), generator, device) * temperature,
            torch.randn(n, batch, self.redundant_dim, generator=generator, device=device) * std,
        )

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None, guidance: Guidance | None = None,
               variance_scale: float = 1.0, temperature: float = 1.0,
               progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
        """Draw (Z^I (B, N, d_I), Z^R (B, N, d_R)) token by token through a preallocated KV cache.

        Without guidance the mixtures are sampled with the decoupled knobs of supplementary §7: the
        Gaussian variance times ``variance_scale`` (s) and the logits divided by ``temperature`` (T), from
        noise drawn up front (:meth:`sampling_noise`). With guidance the conditional and null-class branches
        run as one batch of 2B and ``guidance`` draws each token from the two mixtures (docs/method.md §6);
        its own temperatures apply.
        """
        batch, n = labels.shape[0], self.num_tokens
        draws: _UnguidedDraws | _GuidedDraws
        if guidance is None:
            draws = _UnguidedDraws(self.sampling_noise(batch, generator, variance_scale, temperature, labels.device))
        else:
            draws = _GuidedDraws(guidance, generator, n)
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        decoder = self.transformer.decoder(self.proj_in, self.pos)
        cache = self.transformer.allocate_cache(labels.shape[0], labels.device, self.pos.dtype)
        informative = torch.empty(batch, n, self.informative_dim, device=labels.device, dtype=self.pos.dtype)
        redundant = informative.new_zeros(batch, n, self.redundant_dim)
        h = self.transformer(self._condition(labels), causal=True, cache=cache)[:, -1]
        for i in range(n):
            informative[:, i] = draws.informative(self.informative_head, h, i)
            if i + 1 < n or self.redundant_head is not None:
                # every branch continues from the drawn token
                h = decoder.embed_step(draws.rows(informative[:, i]), self.repeat + i, cache)
            if self.per_token_redundant and self.redundant_head is not None:
                redundant[:, i] = draws.redundant(self.redundant_head, h, i)
            if progress is not None:
                progress(1)
        if self.redundant_head is None or self.per_token_redundant:
            return informative, redundant
        return informative, draws.shared(self.redundant_head, h)


@dataclass(frozen=True)
class _UnguidedDraws:
    """How an unguided :meth:`ARPrior.sample` draws: each mixture with its share of the noise drawn up front,
    which already carries the decoupled knobs (:meth:`ARPrior.sampling_noise`)."""

    noise: SamplingNoise

    @staticmethod
    def rows(x: Tensor) -> Tensor:
        """The decoder's input rows for one step: one per image."""
        return x

    def informative(self, head: MixtureHead, h: Tensor, i: int) -> Tensor:
        return head.sample_with(h, *self.noise.informative(i))

    def redundant(self, head: MixtureHead, h: Tensor, i: int) -> Tensor:
        return head.sample_with(h, *self.noise.redundant(i))

    def shared(self, head: MixtureHead, h: Tensor) -> Tensor:
        # N draws of the one shared mixture: sample dim N first, then (B, N, d_R).
        return head(h).sample_with(self.noise.redundant_gumbel, self.noise.redundant_eps).transpose(0, 1)


@dataclass(frozen=True)
class _GuidedDraws:
    """How a guided :meth:`ARPrior.sample` draws: the batch holds the conditional rows, then the null-class
    rows, and ``guidance`` draws from each pair of mixtures by whatever method it implements (docs/method.md §6)."""

    guidance: Guidance
    generator: torch.Generator | None
    num_tokens: int

    @staticmethod
    def rows(x: Tensor) -> Tensor:
        """The decoder's input rows for one step: the conditional rows, then the same tokens for the null class."""
        return torch.cat([x, x])

    # head(h).chunk(2): the mixtures of the conditional rows (p_c), then of the null-class rows (p_u).
    def informative(self, head: MixtureHead, h: Tensor, i: int) -> Tensor:
        return self.guidance.draw_token(*head(h).chunk(2), self.generator)

    def redundant(self, head: MixtureHead, h: Tensor, i: int) -> Tensor:
        # Per-token redundant mixtures are guided like the informative ones (docs/method.md §11).
        return self.guidance.draw_redundant(*head(h).chunk(2), self.generator)

    def shared(self, head: MixtureHead, h: Tensor) -> Tensor:
        return self.guidance.draw_shared(*head(h).chunk(2), self.num_tokens, self.generator)


class SamplingNoise(NamedTuple):
    """The noise of one unguided AR draw (:meth:`ARPrior.sampling_noise`), token-major: Gumbel noise (N, B, K)
    and Gaussian noise (N, B, D) for the informative and then the redundant mixtures."""

    informative_gumbel: Tensor
    informative_eps: Tensor
    redundant_gumbel: Tensor
    redundant_eps: Tensor

    def informative(self, i: int) -> tuple[Tensor, Tensor]:
        return self.informative_gumbel[i], self.informative_eps[i]

    def redundant(self, i: int) -> tuple[Tensor, Tensor]:
        return self.redundant_gumbel[i], self.redundant_eps[i]


class StandardNormalPrior(nn.Module):
    """N(0, I) on every latent channel: FARMER without the AR, i.e. a plain TARFlow-style flow (baseline)."""

    def __init__(self, config: FarmerConfig) -> None:
        super().__init__()
        self.num_tokens = config.num_tokens
        self.informative_dim = config.token_dim
        self.null_class = config.num_classes

    def log_prob(self, informative: Tensor, redundant: Tensor, labels: Tensor) -> Tensor:
        return self.token_log_probs(informative, redundant, labels)[0].sum(dim=1)

    def token_log_probs(self, informative: Tensor, redundant: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`ARPrior.token_log_probs`: every channel counts as informative here."""
        log_informative = -0.5 * (informative.pow(2) + LOG_2PI).sum(dim=2)
        return log_informative, torch.zeros_like(log_informative)

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: torch.Generator | None = None, guidance: Guidance | None = None,
               variance_scale: float = 1.0, temperature: float = 1.0,
               progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
        if guidance is not None:
            raise ValueError("the standard-normal prior has no class conditioning to guide")
        shape = (labels.shape[0], self.num_tokens, self.informative_dim)
        z = torch.randn(shape, generator=generator, device=labels.device) * math.sqrt(variance_scale)
        return z, z.new_zeros(*shape[:2], 0)
