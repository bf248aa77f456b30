"""The OCI hook command, ``hook poststop`` (what podman runs at every container stop, see
`squashstore.hook`), and `report`, the printing of cleanup outcomes it shares with
``cleanup`` and ``slurm epilog`` (`squashstore.cli.cleanup`).

Its own command module, so that a container stop imports neither the store, nor the Slurm
support, nor the mounters (`squashstore.cli.main.COMMANDS`; NOTES.md, "Poststop hook cost
(branch hook)").
"""

from __future__ import annotations

import sys

from squashstore import cleanup, hook

TYPE_CHECKING = False  # not typing's: the OCI hook (every container stop) skips typing
if TYPE_CHECKING:  # nor argparse: the hook's program prints its report through this module
    import argparse
    from typing import Any

VERBS = {cleanup.UNMOUNT: ("unmounted", "would unmount"),
         cleanup.UNMOUNT_DEAD: ("unmounted dead", "would unmount dead"),
         cleanup.FORGET: ("forgot", "would forget"),
         cleanup.KEEP: ("kept", "would keep")}


def _line(outcome: cleanup.Outcome, dry_run: bool) -> str:
    d = outcome.decision
    done, planned = VERBS[d.action]
    verb = planned if dry_run else done
    if outcome.lazy:
        verb += " (lazily)"
    image = f" image {d.mount.image[:12]}" if d.mount.image else ""
    notes = "".join(f"; {n}" for n in outcome.notes)
    return f"{verb} {d.mount.mountpoint}{image}: {d.reason}{notes}"


def report(outcomes: list[cleanup.Outcome], fmt: str, dry_run: bool) -> int:
    """Print what was done; failures as one line each on stderr; the exit code."""
    if fmt == "json":
        from squashstore.cli.output import print_json

        print_json([o.to_json() for o in outcomes])
    else:
        for outcome in outcomes:
            if not outcome.error and (outcome.decision.action != cleanup.KEEP
                                      or "adopted" in outcome.notes):
                sys.stdout.write(_line(outcome, dry_run) + "\n")
    failed = [o for o in outcomes if o.error]
    for outcome in failed:
        m = outcome.decision.mount
        sys.stderr.write(f"squashstore: {outcome.decision.action} {m.mountpoint}: "
                         f"{outcome.error}\n")
    return 1 if failed else 0


def cmd_hook(args: argparse.Namespace) -> int:
    outcomes = hook.run_poststop(sys.stdin.read())
    return report(outcomes, "table", False)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("hook", help="OCI hook entry points (podman runs them)")
    p.add_argument("stage", choices=("poststop",), help="the hook stage")
    p.set_defaults(func=cmd_hook)
