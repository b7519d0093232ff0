"""Editing and image-to-image recipes: compositions of a denoiser, a grid, a sampler and hooks.

Every recipe goes through :class:`difflab.SampleRequest` / :func:`difflab.generate` (or, where
gradients must flow through the sampler, through :func:`difflab.samplers.sample` itself), so it
works with every registered sampler and with pixel and latent models alike.

=============  ==========================================  =====================================
recipe         paper                                       module
=============  ==========================================  =====================================
``sdedit``     Meng et al. 2022 (SDEdit)                   :mod:`difflab.recipes.sdedit`
``inpaint``    replacement; Lugmayr et al. 2022 (RePaint)  :mod:`difflab.recipes.inpaint`
``diffpure``   Nie et al. 2022 (DiffPure)                  :mod:`difflab.recipes.diffpure`,
                                                           :mod:`~difflab.recipes.robustness`
``anomaly``    Wyatt et al. 2022 (AnoDDPM)                 :mod:`difflab.recipes.anomaly`
=============  ==========================================  =====================================

The command line: ``difflab edit RECIPE RUN ...`` (``difflab edit --help`` lists them).
"""

from __future__ import annotations

RECIPES: tuple[str, ...] = ("sdedit", "inpaint", "diffpure")
"""The recipe modules, in the order ``difflab edit --help`` lists them. Each has
``register_cli(subparsers)`` adding its ``difflab edit NAME`` sub-command."""
