"""The ``fpn-extract`` command: parses options, calls the library, prints. No logic of its own."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import FPNError
from .model import ARCHS, FPN_STYLES, FPNConfig, output_shapes, parameter_count, parse_levels
from .report import format_summary


class SizeType(click.ParamType):
    """``HxW`` -> (H, W), both positive."""

    name = "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            h, w = (int(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not HxW, e.g. 600x900", param, ctx)
        if h < 1 or w < 1:
            self.fail(f"{value!r}: height and width must be positive", param, ctx)
        return h, w


class LevelsType(click.ParamType):
    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_levels(value)
        except FPNError as e:
            self.fail(str(e), param, ctx)


EXAMPLES = """
\b
Examples:
  fpn-extract images/ --out feats/                 P2-P5 of every image, resumable
  fpn-extract --summary --input-size 800x1333      level sizes, no images needed
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--arch", type=click.Choice(list(ARCHS)), default="resnet50", show_default=True, help="Bottom-up ResNet."
)
@click.option(
    "--fpn-style",
    type=click.Choice(FPN_STYLES),
    default=None,
    help="Top-down design [default: reference, or what --weights needs].",
)
@click.option(
    "--levels",
    type=LevelsType(),
    default="p2,p3,p4,p5",
    show_default=True,
    help="Comma-separated from p2,p3,p4,p5,p6,c2,c3,c4,c5.",
)
@click.option("--summary", is_flag=True, help="Print the level sizes and exit; computes no features.")
@click.option(
    "--input-size",
    type=SizeType(),
    default="600x900",
    show_default=True,
    help="Image size (HxW) that --summary reports for.",
)
@click.version_option(__version__, "--version", prog_name="fpn-extract")
def main(arch, fpn_style, levels, summary, input_size):
    """Compute Feature Pyramid Network features (P2-P5) for images."""
    try:
        config = FPNConfig(arch, fpn_style or "reference", levels)
        if summary:
            h, w = input_size
            click.echo(
                format_summary(config, parameter_count(config), [((h, w), output_shapes(config, h, w))])
            )
            return
        raise click.UsageError("extraction is not available yet; use --summary")
    except FPNError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
