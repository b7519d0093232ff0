"""``difflab edit RECIPE RUN ...``: one sub-command per recipe of :mod:`difflab.recipes`."""

from __future__ import annotations

import argparse
import importlib

from difflab.argtypes import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``edit`` and, under it, every recipe's own sub-command."""
    from difflab.recipes import RECIPES

    p = sub.add_parser(
        "edit", help="edit images with a trained model: " + ", ".join(RECIPES),
        description="Editing and image-to-image recipes (difflab.recipes). Each recipe is a "
        "sub-command with its own options: `difflab edit RECIPE --help`. Every recipe works "
        "with every sampler (--sampler) and with pixel and latent models.",
        formatter_class=HelpFormatter)
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name in RECIPES:
        importlib.import_module(f"difflab.recipes.{name}").register_cli(recipes)
