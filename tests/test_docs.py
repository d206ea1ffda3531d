"""The documentation cannot drift: every option is in docs/options.md, the README stays short,
and the links between the pages lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from fpn_cli.cli import WithSubcommands, main

from conftest import run

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_MD = ROOT / "docs" / "options.md"
# pages other engineers write: linked before they exist in every checkout
PAGES_OF_OTHERS = {
    "adding-a-format.md",
    "adding-a-framework.md",
    "architecture.md",
    "geometry.md",
    "inputs.md",
    "reading.md",
    "zoo.md",
}


def commands() -> dict[str, click.Command]:
    """The main form and each subcommand, by the name their section in options.md has."""
    return {"main": main, **WithSubcommands.subcommands}


def option_names(command: click.Command) -> list[str]:
    """Every name an option is given by (``-o`` and ``--out``), help included."""
    ctx = click.Context(command, **command.context_settings)
    return [name for p in command.get_params(ctx) if isinstance(p, click.Option) for name in p.opts]


def section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading of its level or above."""
    start = text.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    rest = text[start + len(heading) :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_every_option_is_in_help_and_options_md():
    help_text = run("--help").output
    documented = section(OPTIONS_MD.read_text(), "# Options")
    main_part = documented.split("## Subcommands")[0]
    assert len(option_names(main)) >= 40
    for name in option_names(main):
        assert name in help_text, name
        assert re.search(rf"`{re.escape(name)}`", main_part), f"{name} is not documented in docs/options.md"


@pytest.mark.parametrize("name", sorted(WithSubcommands.subcommands))
def test_every_subcommand_option_is_in_its_section_of_options_md(name):
    command = WithSubcommands.subcommands[name]
    documented = section(OPTIONS_MD.read_text(), f"### `fpn-extract {name}`")
    help_text = run(name, "--help").output
    for option in option_names(command):
        assert option in help_text, option
        assert f"`{option}`" in documented, (
            f"fpn-extract {name} {option} is not in its section of docs/options.md"
        )


def test_options_md_documents_no_option_that_does_not_exist():
    real = {name for command in commands().values() for name in option_names(command)}
    documented = set(re.findall(r"`(--?[a-z0-9][a-z0-9-]*)`", OPTIONS_MD.read_text()))
    assert documented - real == set()


def test_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_readme_quick_start_is_two_commands():
    text = (ROOT / "README.md").read_text()
    quick = section(text, "## Quick start")
    assert re.findall(r"^    (make \w+)", quick, re.MULTILINE) == ["make demo", "make test"]


def test_readme_first_command_output_is_what_the_shape_report_prints(tmp_path):
    """The pasted output of the first command is that of a real run on examples/ (random weights
    give the shapes; the shapes are what the README shows)."""
    text = (ROOT / "README.md").read_text()
    pasted = section(text, "## The first command")
    shapes = re.findall(r"^        (P2 .*)$", pasted, re.MULTILINE)
    result = run(ROOT / "examples", "-o", tmp_path / "feats", "--arch", "seed", "--device", "cpu")
    assert result.exit_code == 0
    assert shapes and shapes == re.findall(r"^    (P2 .*)$", result.output, re.MULTILINE)
    assert "5 images: 5 written, 0 already complete, 0 failed" in pasted


def local_links(path: Path) -> list[tuple[str, Path]]:
    text = path.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    return [(t, (path.parent / t).resolve()) for t in targets if "://" not in t]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_local_links_lead_to_files(page):
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    for target, resolved in local_links(path):
        if resolved.name in PAGES_OF_OTHERS:
            continue
        assert resolved.exists(), f"{page} links to {target}, which does not exist"
