"""The baselines' objectives (``[objective] name = "elbo"`` / ``"gan"``); the losses are computed
by their tasks (:mod:`difflab.baselines.tasks`), which own the two-part GAN update."""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import bad_value


@dataclass(frozen=True)
class ElboObjective:
    """The VAE's negative ELBO, with ``beta`` on the KL term (1: the ELBO itself)."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise bad_value("objective.beta", self.beta, "a number > 0")


@dataclass(frozen=True)
class GanObjective:
    """The GAN game: ``loss = "non_saturating"`` (Goodfellow et al. 2014, Sec. 3: the generator
    maximises ``log D(G(z))``; DCGAN's choice) or ``"hinge"``."""

    loss: str = "non_saturating"

    def __post_init__(self) -> None:
        if self.loss not in ("non_saturating", "hinge"):
            raise bad_value("objective.loss", self.loss, "'non_saturating' or 'hinge'")


def _elbo(*, beta: float = 1.0) -> ElboObjective:
    return ElboObjective(beta=beta)


def _gan(*, loss: str = "non_saturating") -> GanObjective:
    return GanObjective(loss=loss)
