"""Write a yearly checkpoint in open_clip's format: `python tools/export.py --run runs/x --year 2016 --out 2016.pt`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.model import create_model
from trainer.rundir import RunDir, year_tag
from trainer.weights.open_clip import export_local_dir, export_pt, load_hint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/export.py", description=__doc__)
    p.add_argument("--run", required=True, type=Path, help="run folder (runs/<name>)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--year", help="export the checkpoint at the end of this year's step")
    which.add_argument("--tag", help="export any checkpoint tag (e.g. step-1200)")
    p.add_argument("--out", required=True, type=Path, help="output .pt file, or folder for local-dir")
    p.add_argument(
        "--format",
        choices=["pt", "local-dir"],
        default="pt",
        help="pt: {state_dict, epoch, name} for pretrained=path; local-dir: config + safetensors",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    args = p.parse_args(argv)
    tag = args.tag or year_tag(args.year)
    try:
        if args.format == "pt":
            out = export_pt(args.run, tag, args.out, args.overwrite)
        else:
            model = create_model(RunDir(args.run).load_config().model)[0]
            out = export_local_dir(args.run, tag, args.out, dict(model.visual.preprocess_cfg), args.overwrite)
        hint = load_hint(RunDir(args.run).load_config(), out, args.format)
    except UserError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}  ({hint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
