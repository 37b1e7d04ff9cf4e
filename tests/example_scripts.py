"""Loading the example scripts (``examples/*.py``) as modules, for the tests that run them,
and reading the PNGs they write."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module. The examples folder goes on the import path, as
    it is when a script runs (``common``, what they share)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"holotx_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_png(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """Width, height and the set of colours of an 8-bit RGB or RGBA PNG. Its chunks are
    walked here (each chunk's CRC checked, IHDR first, IEND last); the pixels are decoded
    by Pillow (matplotlib's own dependency)."""
    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) in {(8, 2), (8, 6)}  # 8-bit RGB or RGBA
    image = Image.open(io.BytesIO(data))
    assert image.size == (width, height)
    colors = image.convert("RGB").getcolors(maxcolors=width * height)
    return width, height, {c for _, c in colors}
