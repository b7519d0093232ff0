"""Types and checks of command-line values shared by every ``difflab`` sub-command: each bad
value is refused by argparse (or :func:`output_file` / :func:`output_folder`) with one line that
names the flag and what is accepted, before any work starts."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from difflab.errors import bad_value


def _number(kind: type, low: float, inclusive: bool, what: str):
    """An argparse ``type`` accepting ``kind`` values above ``low`` (or from it)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, True, "a positive integer (1, 2, ...)")
count_from_zero = _number(int, 0, True, "an integer >= 0")
positive_float = _number(float, 0.0, False, "a positive number")
non_negative_float = _number(float, 0.0, True, "a number >= 0")


def fraction(text: str) -> float:
    """An argparse ``type``: a number in ``(0, 1]`` (img2img strength)."""
    try:
        value = positive_float(text)
    except argparse.ArgumentTypeError:
        value = None
    if value is None or value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


fraction.__name__ = "a number in (0, 1]"


def device_name(text: str) -> str:
    """An argparse ``type``: a torch device this PyTorch can use (``cpu``, ``cuda``, ``cuda:1``,
    ``mps``)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; expected cpu, cuda, "
                                         "cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = ("this PyTorch build has no CUDA" if torch.version.cuda is None
                     else "no GPU is visible")
            raise argparse.ArgumentTypeError(f"{text!r}: {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} "
                                             "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda, cuda:N or mps")
    return text


def output_file(flag: str, value: str | None, suffixes: tuple[str, ...] = ()) -> Path | None:
    """``value`` checked as a file to write: not a folder, with one of ``suffixes``."""
    if value is None:
        return None
    p = Path(value)
    if p.is_dir():
        raise bad_value(flag, value, f"a file to write, not a folder{_suffix_hint(suffixes)}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise bad_value(flag, value, f"a file name ending in {' or '.join(suffixes)}")
    if p.parent.exists() and not p.parent.is_dir():
        raise bad_value(flag, value, f"a path whose folder {p.parent} is a folder, not a file")
    return p


def output_folder(flag: str, value: str | None) -> Path | None:
    """``value`` checked as a folder to write into (it may not exist yet)."""
    if value is None:
        return None
    p = Path(value)
    if p.exists() and not p.is_dir():
        raise bad_value(flag, value, "a folder (this is an existing file)")
    return p


def _suffix_hint(suffixes: tuple[str, ...]) -> str:
    return f" (e.g. samples{suffixes[0]})" if suffixes else ""


def existing_folder(flag: str):
    """An argparse type: a folder that exists."""
    def check(text: str) -> str:
        if not Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
        return text

    check.__name__ = flag
    return check


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.splitlines():
            if line.startswith("  ") or not line.strip():
                out.append(indent + line)
            else:
                out.append(textwrap.fill(line, width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n".join(out)


def key_value(item: str, flag: str = "--option") -> tuple[str, object]:
    """``k=v`` with ``v`` parsed as a TOML literal when possible (as ``--set``)."""
    from difflab.config import parse_override

    if "=" not in item:
        raise bad_value(flag, item, "KEY=VALUE, e.g. eta=0.5")
    keys, value = parse_override(item)
    if len(keys) != 1:
        raise bad_value(flag, item, "KEY=VALUE with a plain key, e.g. eta=0.5")
    return keys[0], value


def set_threads(n: int | None) -> None:
    """``--threads``: torch's intra-op threads (None: leave as is)."""
    if n is None:
        return
    if n < 1:
        raise bad_value("--threads", n, "a positive number of threads")
    import torch

    torch.set_num_threads(n)
