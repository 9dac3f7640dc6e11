"""The on-disk dataset contract shared by data preparation (trainer/prep) and reading (trainer/data).

<root>/manifest.json            written last by make_shards: marks the dataset complete
<root>/<split>/<task>/NNNNNN.tar webdataset shards; a sample is <key>.<image ext>, .txt, .json[, .cls]
<root>/<split>/<task>/sizes.json {"000000.tar": samples, ...}
"""

FORMAT = "tic-trainer-shards/1"
"""The `format` tag in manifest.json."""
MANIFEST = "manifest.json"
SIZES = "sizes.json"
SPLITS = ("train", "eval")
TRAIN, EVAL = SPLITS
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image members a reader accepts, in order of preference (make_shards writes jpg, png or webp)."""
CAPTION, METADATA, CLASS = "txt", "json", "cls"
MAX_IMAGE_PIXELS = 89_478_485
"""The largest image (width x height) make_shards stores and a reader decodes: PIL's own
decompression-bomb warning size. A larger one is refused from its header, never decoded."""
MAX_MEMBER_BYTES = 512 * 2**20
"""The largest tar member read into memory; a larger one is skipped unread. Above any image within
MAX_IMAGE_PIXELS (4 bytes a pixel uncompressed is 358 MB), so it only ever stops junk."""
