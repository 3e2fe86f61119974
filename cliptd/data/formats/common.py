"""Streaming readers of the real VCR / SNLI-VE / VQA v2 files, as they ship.

Each task module (``vcr``, ``snli_ve``, ``vqa``) exposes the same four functions:

- ``splits(src, variant)``: the split names whose files are present under ``src``;
- ``source_files(src, split, variant)``: the annotation files of a split (hashed for the
  dataset version);
- ``image_root(src, variant)``: the folder that the rows' ``image`` paths are relative to;
- ``read(src, split, opts)``: an iterator of dicts matching ``cliptd.data.schema.INSTANCE_SCHEMA``.

Bad input raises :class:`cliptd.core.errors.DataError` naming file, line and field.
This module holds what the readers share: JSON streaming, field checks, image headers,
region sources for box-less datasets (box file or grid) and the domain mapping.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from cliptd.core.config import TASKS
from cliptd.core.errors import DataError

# Real VCR boxes are floats from a detector and can overshoot the image edge slightly.
BOX_TOLERANCE_PX = 1.0


@dataclass
class ReadOptions:
    """What a reader needs besides the source folder."""

    regions: RegionSource | None = None  # SNLI-VE / VQA only (VCR has its own boxes)
    domains: dict[str, str] = field(default_factory=dict)  # image path -> domain
    variant: str | None = None  # "vqacp" for VQA-CP v2


def reader(task: str) -> ModuleType:
    """The format module of ``task``; an unknown task is a DataError."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return import_module(f"cliptd.data.formats.{task}")


# --- rows -------------------------------------------------------------------------------


def make_row(**fields: Any) -> dict[str, Any]:
    """A schema row with the task-independent defaults filled in (empty lists, -1, "")."""
    row: dict[str, Any] = {
        "candidates": [],
        "candidates_regions": [],
        "label": -1,
        "rationales": [],
        "rationales_regions": [],
        "rationale_label": -1,
        "answers": [],
        "qtype": "",
        "domain": "",
        "meta": "{}",
    }
    row.update(fields)
    return row


def dump_meta(obj: dict[str, Any]) -> str:
    # Sorted keys: the same input always gives the same bytes (the dataset hash sees them).
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Simple word tokenization: words (keeping inner apostrophes) and single punctuation."""
    return _WORD.findall(text)


# --- field checks -----------------------------------------------------------------------


def require(obj: Any, name: str, file: Path, line: int | None, types: Any = None) -> Any:
    """``obj[name]``, or a DataError when the record is not an object, lacks it or has the
    wrong type."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=file, line=line)
    if name not in obj:
        raise DataError("missing field", file=file, line=line, field=name)
    value = obj[name]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool)):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(
            f"expected {want}, got {type(value).__name__}", file=file, line=line, field=name
        )
    return value


def check_box(
    box: Any, width: float, height: float, file: Path, line: int | None, name: str
) -> list[float]:
    """Validate ``[x1, y1, x2, y2, ...]`` against the image and clip it to the image.

    Boxes more than BOX_TOLERANCE_PX outside the image, or inverted, are errors (they mean
    the boxes belong to another image); within the tolerance they are clipped so that crops
    never leave the image.
    """
    if (
        not isinstance(box, list | tuple)
        or len(box) < 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box[:4])
    ):
        raise DataError(f"expected [x1, y1, x2, y2], got {box!r}", file=file, line=line, field=name)
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    tol = BOX_TOLERANCE_PX
    if not all(map(math.isfinite, (x1, y1, x2, y2))) or (
        x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol or x2 < x1 or y2 < y1
    ):
        raise DataError(
            f"box {[x1, y1, x2, y2]} is outside its {width}x{height} image",
            file=file,
            line=line,
            field=name,
        )
    return [
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    ]


# --- files ------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=lineno) from None


def load_json(path: Path, what: str = "JSON file") -> Any:
    """A whole (small) JSON document; missing or malformed is a DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"missing {what}", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None


class _JSONStream:
    """Incremental reader of one JSON document, value by value, with bounded memory.

    The VQA files are single JSON documents of hundreds of MB; ``json.load`` would hold the
    whole parse tree. This walks the top level and decodes one array element at a time
    with ``JSONDecoder.raw_decode`` over a sliding text buffer, counting newlines so that
    errors can still name a line.
    """

    _CHUNK = 1 << 20

    def __init__(self, f: Any, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self._counted = 1, 0  # line number at buf[_counted]
        self.decoder = json.JSONDecoder()

    def _fill(self, size: int) -> bool:
        if self.eof:
            return False
        # Drop consumed text; keep the newline count of what is dropped.
        self.line += self.buf.count("\n", self._counted, self.pos)
        self.buf, self._counted, self.pos = self.buf[self.pos :], 0, 0
        chunk = self.f.read(size)
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def line_at(self, pos: int) -> int:
        self.line += self.buf.count("\n", self._counted, pos)
        self._counted = pos
        return self.line

    def error(self, msg: str) -> DataError:
        return DataError(f"malformed JSON: {msg}", file=self.path, line=self.line_at(self.pos))

    def peek(self) -> str:
        """The next non-blank character ("" at end of file)."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < n or not self._fill(self._CHUNK):
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(f"expected one of {chars!r}, got {c or 'end of file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        size = self._CHUNK
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # Either the value runs past the buffer (read more) or it is broken.
                # A number at the very end of the buffer may be truncated: read more too.
                if self._fill(size):
                    size *= 2  # a huge value: grow, so that retries stay linear overall
                    continue
                raise self.error(e.msg) from None
            if end == len(self.buf) and not self.eof and self._fill(size):
                continue  # e.g. a number cut by the chunk boundary: decode again
            self.pos = end
            return value

    def array(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(line, element)`` of the array that starts here."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            self.peek()
            line = self.line_at(self.pos)
            yield line, self.value()
            if self.expect(",]") == "]":
                return


def iter_json_array(path: Path, key: str | None = None) -> Iterator[tuple[int, Any]]:
    """Stream ``(line, element)`` of a JSON array: the top-level array (``key=None``, as in
    the VQA-CP files) or the array under top-level ``key`` (as in the VQA v2 files)."""
    if not path.is_file():
        raise DataError("missing file", file=path)
    with open(path, encoding="utf-8") as f:
        s = _JSONStream(f, path)
        if key is None:
            yield from s.array()
            return
        s.expect("{")
        while s.peek() != "}":
            name = s.value()
            s.expect(":")
            if name == key:
                yield from s.array()
                return
            s.value()  # skip other top-level entries (info, license, ...)
            if s.expect(",}") == "}":
                break
        raise DataError("missing field", file=path, field=key)


@lru_cache(maxsize=4096)
def _image_size(path: str) -> tuple[int, int]:
    # Image.open reads the header only; the pixels are never decoded here.
    with Image.open(path) as im:
        return im.size


def image_size(path: Path, file: Path, line: int | None, name: str) -> tuple[int, int]:
    """(width, height) from the image header; a missing or unreadable image is a DataError
    that points at the record referring to it."""
    try:
        return _image_size(str(path))
    except FileNotFoundError:
        raise DataError(f"missing image {path}", file=file, line=line, field=name) from None
    except OSError as e:
        raise DataError(f"unreadable image {path}: {e}", file=file, line=line, field=name) from None


# --- regions for box-less datasets ------------------------------------------------------


class RegionSource:
    """Regions 1.. of SNLI-VE / VQA images: from a box file or an N x N grid.

    The box file is a JSON object ``{image path relative to the image folder: [[x1, y1, x2,
    y2], ...]}``; an image it does not list gets only region 0 (the whole image).
    """

    def __init__(self, boxes: Path | None = None, grid: int | None = None) -> None:
        if boxes is not None and grid is not None:
            raise DataError("give either a box file or a grid, not both")
        if grid is not None and grid < 1:
            raise DataError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.boxes_path = Path(boxes) if boxes is not None else None
        self.boxes: dict[str, Any] = {}
        if self.boxes_path is not None:
            self.boxes = load_json(self.boxes_path, "box file")
            if not isinstance(self.boxes, dict):
                raise DataError("box file must be a JSON object: image path -> boxes", file=self.boxes_path)

    def regions(self, image: str, width: int, height: int) -> tuple[list[list[float]], list[str]]:
        """Boxes and names of regions 1.. (region 0 is added by the caller)."""
        if self.grid:
            n = self.grid
            boxes = [
                [c * width / n, r * height / n, (c + 1) * width / n, (r + 1) * height / n]
                for r in range(n)
                for c in range(n)
            ]
            return boxes, [f"cell_{r}_{c}" for r in range(n) for c in range(n)]
        listed = self.boxes.get(image, [])
        if not isinstance(listed, list):
            raise DataError("expected a list of boxes", file=self.boxes_path, field=image)
        boxes = [check_box(b, width, height, self.boxes_path, None, image) for b in listed]
        return boxes, ["region"] * len(boxes)


def whole_image(width: int, height: int) -> list[float]:
    return [0.0, 0.0, float(width), float(height)]


def load_domains(path: Path | None) -> dict[str, str]:
    """The optional domain mapping: image path (as stored in ``image``) -> domain tag."""
    if path is None:
        return {}
    mapping = load_json(Path(path), "domains file")
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError("domains file must be a JSON object: image path -> domain string", file=path)
    return mapping
