"""The documents' result tables, written from the outputs of the recipes in conf/experiment/.

README.md and docs/results.md hold blocks `<!-- report:NAME -->` ... `<!-- /report:NAME -->`;
`python report.py` replaces each block's contents by what BLOCKS[NAME] makes of the recipe's
outputs, with the machine, versions (and, in docs/, the commit and date) that its
provenance.jsonl files record, and copies the figures the documents show into docs/. A block whose
recipe's outputs are not here keeps what it holds (the tables a clone brings, a remake's tables not yet
remade); an empty one says the recipe has not been run and names its command. Nothing in a block is
typed by hand.
Each study of conf/experiment/<study>/ has its blocks in a module of vae/report/.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path

from vae.report import default, estimators, levers, likelihoods, one_hour, reliability, speed
from vae.report.common import NotRun, Outputs


BLOCK = re.compile(r"(?P<start><!-- report:(?P<name>\w+) -->\n)(?P<body>.*?)(?P<end><!-- /report:(?P=name) -->)", re.DOTALL)


BLOCKS: dict[str, Callable[[Outputs], str]] = {
    **default.BLOCKS, **estimators.BLOCKS, **likelihoods.BLOCKS, **one_hour.BLOCKS, **levers.BLOCKS,
    **speed.BLOCKS, **reliability.BLOCKS,
}


class UnknownBlock(KeyError):
    """A report block name that BLOCKS does not know; report.py says it in one line."""


def check_blocks(only: Collection[str] | None) -> None:
    unknown = sorted(set(only or ()) - set(BLOCKS))
    if unknown:
        raise UnknownBlock(f"blocks={unknown}: no such block; known: {', '.join(BLOCKS)}")


def fill(text: str, out: Outputs, only: Collection[str] | None = None) -> str:
    """`text` with every report block's contents (or those of the blocks named in `only`) made
    anew from the outputs."""
    check_blocks(only)

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise UnknownBlock(f"<!-- report:{name} -->: no such block; known: {', '.join(BLOCKS)}")
        if only is not None and name not in only:
            return match.group(0)
        try:
            contents = BLOCKS[name](out)
        except NotRun as missing:
            if match["body"].strip() and not match["body"].startswith("_Not run yet"):
                return match.group(0)  # its table, made where the outputs are, stays
            contents = f"_Not run yet: `{missing}`._"
        return f"{match['start']}{contents}\n{match['end']}"

    return BLOCK.sub(block, text)


def write_results(experiments: Path, sweeps: Path, documents: list[Path], figures: Path,
                  only: Collection[str] | None = None) -> list[Path]:
    """Fill the report blocks of each document (those named in `only`; docs/ documents with commits
    and dates); return them."""
    check_blocks(only)
    figures.mkdir(parents=True, exist_ok=True)
    for document in documents:
        if not document.is_file():
            raise FileNotFoundError(f"no document {document} to fill in")
        out = Outputs(experiments, sweeps, figures, full=document.name != "README.md")
        document.write_text(fill(document.read_text(), out, only))
    return documents
