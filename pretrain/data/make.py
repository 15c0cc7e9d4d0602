"""Samples for `pretrain shards make`: from an image folder (a class per sub-folder), a CSV/parquet table of
(path, caption), or the digits demo. Image files are stored as they are, not re-encoded."""
import csv
import os
from collections.abc import Iterator

from pretrain.data.decode import IMAGE_EXTENSIONS


def _image_member(path: str) -> tuple[str, bytes]:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: not one of the image types {IMAGE_EXTENSIONS}")
    with open(path, "rb") as f:
        return extension, f.read()


def folder_classes(root: str) -> list[str]:
    """Sub-folder names, sorted: label i is the i-th."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    return classes


def folder_samples(root: str, classes: list[str]) -> Iterator[dict]:
    """KEY.<image ext> + KEY.cls for every image file under root/<class>/, in sorted order."""
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if os.path.splitext(file)[1].lower().lstrip(".") in IMAGE_EXTENSIONS:
                extension, data = _image_member(os.path.join(folder, file))
                yield {extension: data, "cls": label}


def _table_rows(path: str) -> Iterator[dict]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from error
        yield from pq.read_table(path, columns=["path", "caption"]).to_pylist()
    else:
        with open(path, newline="") as f:
            yield from csv.DictReader(f)


def table_samples(path: str) -> Iterator[dict]:
    """KEY.<image ext> + KEY.txt + KEY.json from a table with `path` and `caption` columns; relative image paths are
    taken from the table's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    for row in _table_rows(path):
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{path}: needs columns 'path' and 'caption', found {sorted(row)}")
        extension, data = _image_member(os.path.join(folder, row["path"]))
        yield {extension: data, "txt": row["caption"], "json": {"url": row["path"], "caption": row["caption"]}}
