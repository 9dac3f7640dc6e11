"""The options of a shard-preparation job (tools/make_shards.py) and the user-facing error it raises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from trainer.errors import UserError
from trainer.years import expand

RESIZE_MODES = ("center_crop", "border", "keep_ratio")
IMAGE_FORMATS = ("keep", "jpg", "png", "webp")
SHARD_SIZE, SYNTHETIC_SHARD_SIZE = 10_000, 500
SYNTHETIC_YEARS, SYNTHETIC_IMAGE_SIZE = "2014-2016", 32


class PrepError(UserError, ValueError):
    """Bad input or options: the message names the file/option/value and what would be valid."""


@dataclass(kw_only=True)
class PrepOptions:
    """Everything a make_shards run needs; `output_options()` are the ones that decide the bytes written."""

    out: str
    """Output root: local path or fsspec URL (s3://, gs://, memory://, ...)."""
    source: Literal["synthetic", "manifest", "shards"]
    """Which kind of input to read."""
    input: str = ""
    """Manifest file (CSV/TSV/JSONL/Parquet) or webdataset shards (folder, brace pattern or glob)."""
    years: str | None = None
    """Synthetic: the years to generate (default 2014-2016). Real data: keep only these years."""
    seed: int = 0
    """Seed for the order of samples inside shards and for synthetic images."""
    shard_size: int | None = None
    """Most samples in one shard (default 10,000; 500 for synthetic, so each year has several shards)."""
    eval_frac: float = 0.01
    """Real data: fraction of each year held out as eval, chosen by a hash of the uid."""
    samples_per_year: int = 2000
    """Synthetic: training samples per year."""
    eval_samples: int = 500
    """Synthetic: held-out eval samples per year."""
    image_size: int | None = None
    """Resize images to this many pixels (see resize_mode); real images keep their size by default, synthetic 32."""
    resize_mode: str = "center_crop"
    """center_crop: shorter side to size then crop; border: longer side to size then pad; keep_ratio: shorter side."""
    image_format: str = "keep"
    """Image encoding in the shards; keep = the input's own jpg/png/webp bytes (PNG for synthetic)."""
    image_root: str | None = None
    """Manifest: the folder every local image path must lie in, and relative ones resolve against
    (default: the manifest's folder). Paths leaving it are skipped as image_outside_root."""
    image_col: str | None = None
    """Manifest column with the image path or URL (default: first of image, path, filepath, file, url)."""
    caption_col: str | None = None
    """Manifest column with the caption (default: first of caption, text, txt, title)."""
    time_col: str | None = None
    """Manifest or uid-table column with a year or a timestamp (default: first of year, timestamp, date, time)."""
    uid_col: str | None = None
    """Manifest or uid-table column with the sample uid (default: uid if present, else a hash of the image path)."""
    class_col: str | None = None
    """Manifest column with an integer class index, written as .cls."""
    year_field: str | None = None
    """Shards: json field holding the year or timestamp (the default when no uid table is given: year)."""
    uid_years: str | None = None
    """Shards: Parquet table mapping uid to year/timestamp."""
    uid_lists: str | None = None
    """Shards: folder of TiC-DataComp style uid lists, one <year>.npy per year."""
    classes: str | None = None
    """Text file of class names, one per line in index order, recorded in manifest.json."""
    templates: str | None = None
    """Text file of zero-shot templates with a {} placeholder, one per line."""
    workers: int = 1
    """Processes working in parallel (memory:// output always runs in this process)."""
    max_bad_frac: float = 0.05
    """Fail (exit 2, nothing written) when more than this fraction of input samples is unusable."""
    overwrite: bool = False
    """Replace an existing output made with different options."""
    progress: bool = False
    """Show progress bars on stderr."""

    def __post_init__(self) -> None:
        synthetic = self.source == "synthetic"
        if self.shard_size is None:
            self.shard_size = SYNTHETIC_SHARD_SIZE if synthetic else SHARD_SIZE
        if self.image_size is None and synthetic:
            self.image_size = SYNTHETIC_IMAGE_SIZE

    def validate(self) -> None:
        """Raise PrepError naming the first option with an invalid value."""
        checks = [
            ((self.shard_size or 0) >= 1, "--shard-size must be at least 1"),
            (0.0 <= self.eval_frac < 1.0, "--eval-frac must be in [0, 1)"),
            (0.0 <= self.max_bad_frac <= 1.0, "--max-bad-frac must be in [0, 1]"),
            (self.samples_per_year >= 1, "--samples-per-year must be at least 1"),
            (self.eval_samples >= 0, "--eval-samples must be 0 or more"),
            (self.image_size is None or 8 <= self.image_size <= 8192, "--image-size must be in 8..8192"),
            (self.workers >= 1, "--workers must be at least 1"),
            (self.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {', '.join(RESIZE_MODES)}"),
            (self.image_format in IMAGE_FORMATS, f"--image-format must be one of {', '.join(IMAGE_FORMATS)}"),
            (self.source == "synthetic" or self.input, f"--{self.source} needs an input path"),
            (
                sum(x is not None for x in (self.year_field, self.uid_years, self.uid_lists)) <= 1,
                "give only one of --year-field, --uid-years, --uid-lists",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PrepError(message)
        if self.years is not None:
            expand(self.years)

    def year_list(self) -> list[int] | None:
        """The --years selection as a sorted list (synthetic default 2014-2016), or None for all years."""
        spec = self.years if self.years is not None else (SYNTHETIC_YEARS if self.source == "synthetic" else None)
        return None if spec is None else expand(spec)

    def output_options(self, resolved: dict[str, Any]) -> dict[str, Any]:
        """The options that decide the output bytes, plus what was resolved from the input (column names)."""
        runtime = {"out", "workers", "max_bad_frac", "overwrite", "progress"}
        if self.source == "synthetic":
            runtime |= {
                "eval_frac",
                "image_col",
                "image_root",
                "caption_col",
                "time_col",
                "uid_col",
                "class_col",
                "year_field",
                "uid_years",
                "uid_lists",
                "input",
                "resize_mode",
                "classes",
                "templates",
            }
        else:
            runtime |= {"samples_per_year", "eval_samples"}
        chosen = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in runtime}
        if chosen.get("image_root") is None:
            # Recorded only when given, so outputs made before the option existed still match.
            chosen.pop("image_root", None)
        chosen.update(resolved)
        chosen["years"] = self.year_list()
        return chosen
