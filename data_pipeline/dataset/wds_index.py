"""DALI index files for WebDataset tar shards (the format ``wds2idx`` writes).

Line 1 is ``v1.2 <num_samples>``; then one line per sample listing, for each of its files,
``<ext> <data offset> <size> <member name>``. Offsets point at the file data, just after its
512-byte tar header, so DALI can read a sample without scanning the archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Component:
    ext: str
    offset: int
    size: int
    name: str


@dataclass(frozen=True)
class IndexedSample:
    key: str
    components: tuple[Component, ...]

    def component(self, ext: str) -> Component:
        for c in self.components:
            if c.ext == ext:
                return c
        raise KeyError(f"sample {self.key} has no .{ext} file")


class IndexError_(ValueError):
    """An index file is missing, malformed, or disagrees with its tar."""


def write_index(path: str | Path, samples: list[IndexedSample]) -> None:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for s in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in s.components))
    Path(path).write_text("\n".join(lines) + "\n")


def read_index(path: str | Path) -> list[IndexedSample]:
    path = Path(path)
    if not path.is_file():
        raise IndexError_(f"index file {path} is missing")
    lines = path.read_text().splitlines()
    if not lines:
        raise IndexError_(f"index file {path} is empty")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise IndexError_(f"index file {path}: expected header '{INDEX_VERSION} <count>', got {lines[0]!r}")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise IndexError_(f"index file {path}: header says {count} samples, found {len(body)} lines")
    samples = []
    for ln in body:
        fields = ln.split()
        if len(fields) % 4:
            raise IndexError_(f"index file {path}: malformed line {ln!r}")
        comps = tuple(
            Component(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
            for i in range(0, len(fields), 4)
        )
        key = comps[0].name[: comps[0].name.find(".", comps[0].name.rfind("/") + 1)]
        samples.append(IndexedSample(key, comps))
    return samples
