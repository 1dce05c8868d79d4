"""What kiln ships to start from: the example plan and the systemd unit (package data), and the
`kiln init DIR` verb that writes a commented copy of both.

The files live in `kiln/data/` and are found with `importlib.resources`; kiln imports a compiled
extension, so the package is always a real folder and each resource a real path (a plan's
relative rule-file paths resolve against it as for any other plan).
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import TextIO

from kiln.errors import KilnError

__all__ = [
    "UNIT_KILN",
    "UNIT_PLAN",
    "add_init_arguments",
    "example_plan_path",
    "init_main",
    "package_file",
    "starter_plan",
    "starter_unit",
    "unit_path",
]

#: The kiln command and the plan the shipped unit names; `kiln init` puts in the real ones.
UNIT_KILN = "/opt/kiln/venv/bin/kiln"
UNIT_PLAN = "/etc/kiln/plan.yaml"

_HEADER = """\
# A starter warm-up plan, written by `kiln init` from kiln's example plan. The numbered notes
# say what to change first; every key is documented in kiln's schedules/README.md, and
# `kiln schema` gives your editor the JSON Schema. Then check it and see what it allows:
#   kiln check plan.yaml             every mistake at once, each with its line and column
#   kiln plan plan.yaml --days 14    the caps day by day, per batch and provider
# and run it: `kiln run --config plan.yaml` (as a service: the unit kiln init wrote beside it).
"""

#: Notes written above the plan's top-level keys, in the order a newcomer changes them.
_NOTES = {
    "name": """\
# 1. Name the plan (lower-case letters, digits, -_.) and give the time zone whose midnight
#    ends a warm-up day: caps reset and ramps move at that roll-over, DST included.
""",
    "pools": """\
# 2. Pools: the IPs that already send and are warm, grouped by stream or tenant. `weight`
#    shares a pool's traffic between its IPs; `overflow` names the pool that takes traffic
#    when no IP here has room. The addresses below are documentation addresses: use yours.
""",
    "batches": """\
# 3. Batches: new IPs that warm together, the pool they join, the schedule they follow, and
#    start_date, their warm-up day 0 in the plan's time zone.
""",
    "schedules": """\
# 4. Schedules: the warm-up curve. Each step is one sending day's cap per IP; a ramp moves
#    up a step only after a day on which more than delivered_above_percent of its cap was
#    reported delivered (the `report` op), so an MTA that reports nothing never advances.
#    `providers` varies the curve per mailbox provider: a `scale`, or a curve of its own.
""",
}


def package_file(*parts: str) -> Path:
    """The real path of a file shipped in the kiln package, such as ("data", "rules.yaml")."""
    resource = importlib.resources.files("kiln").joinpath(*parts)
    if not isinstance(resource, Path):  # a zip import; kiln's extension rules that out
        raise KilnError(f"kiln's package data is not in a folder: {resource}")
    if not resource.is_file():
        raise KilnError(f"kiln's package data is missing {'/'.join(parts)} (a broken install?)")
    return resource


def example_plan_path() -> Path:
    """The embedded example plan: what `kiln run` runs without --config."""
    return package_file("data", "plans", "example.yaml")


def unit_path() -> Path:
    """The shipped systemd unit."""
    return package_file("data", "systemd", "kiln.service")


def starter_plan() -> str:
    """The example plan, its opening comment replaced by notes for a newcomer."""
    lines = example_plan_path().read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    out = [_HEADER]
    for line in lines:
        key = line.split(":", 1)[0]
        if not line[:1].isspace() and key in _NOTES:
            out.append("\n" if out[-1].strip() else "")
            out.append(_NOTES[key])
        out.append(line)
    return "".join(out)


def _kiln_command() -> Path | None:
    """The absolute path of this installation's `kiln` command, if it can be found: the one
    that was run, as typed (through a link such as a `current` virtualenv, not resolved), else
    the one in this interpreter's scripts folder, else the first on PATH."""
    invoked = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if invoked is not None and invoked.name == "kiln" and invoked.is_file():
        return invoked.absolute()
    beside = Path(sysconfig.get_path("scripts")) / "kiln"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("kiln")
    return Path(found).absolute() if found else None


def starter_unit(plan: Path, kiln: Path | None) -> str:
    """The shipped unit running `kiln` (when known) on `plan` (made absolute)."""
    text = unit_path().read_text(encoding="utf-8")
    text = text.replace(UNIT_PLAN, str(plan.absolute()))
    if kiln is not None:
        text = text.replace(UNIT_KILN, str(kiln))
    return text


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `kiln init`."""
    parser.add_argument(
        "dir", metavar="DIR", type=Path, help="folder to write to (made if missing)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite plan.yaml and kiln.service if they exist"
    )


def _say(text: str, stream: TextIO | None = None) -> None:
    """A line on stdout (or `stream`)."""
    (stream or sys.stdout).write(text + "\n")


def init_main(args: argparse.Namespace) -> int:
    """`kiln init DIR`: write DIR/plan.yaml and DIR/kiln.service. Exit 0 when both are written,
    1 when a file exists (without --force; nothing is written then) or cannot be written."""
    folder: Path = args.dir
    plan, unit = folder / "plan.yaml", folder / "kiln.service"
    existing = [p for p in (plan, unit) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        names = " and ".join(str(p) for p in existing)
        _say(
            f"kiln init: {names} already exist{'s' if len(existing) == 1 else ''}; "
            "nothing written (--force overwrites)",
            sys.stderr,
        )
        return 1
    kiln = _kiln_command()
    try:
        plan_text, unit_text = starter_plan(), starter_unit(plan, kiln)
        folder.mkdir(parents=True, exist_ok=True)
        mode = "w" if args.force else "x"
        for path, text in ((plan, plan_text), (unit, unit_text)):
            with path.open(mode, encoding="utf-8") as f:
                f.write(text)
    except (OSError, KilnError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        _say(f"kiln init: cannot write to {folder}: {reason}{where}", sys.stderr)
        return 1
    command = str(kiln) if kiln is not None else UNIT_KILN
    _say(f"wrote {plan}: the example plan, with notes on what to change first")
    _say(f"wrote {unit}: a systemd unit running {command} run --config {plan.absolute()}")
    if kiln is None:
        _say(f"  the kiln command was not found: the unit says {UNIT_KILN}; correct it")
    if plan.absolute().parts[1:2] in (("home",), ("root",)):
        _say(f"  the unit's ProtectHome=yes hides {plan.absolute()} from the service: keep the")
        _say("  plan it runs outside home folders (docs/install.md uses /etc/kiln)")
    _say("next:")
    _say(f"  kiln check {plan}")
    _say(f"  kiln plan {plan} --days 14")
    _say(f"  kiln run --config {plan}       # state in ./.state; Ctrl-C stops it")
    _say(f"  as a service: set the socket group in {unit}, then install it (docs/install.md)")
    return 0
