"""Reading a checkpoint's JSON files (config, index, description) with typed errors; torch-free."""
from __future__ import annotations

import json
from pathlib import Path

from edgelmm.errors import CheckpointError


def json_type(value) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, boolean or null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def read_json(path: Path) -> dict:
    """Parse a JSON file holding an object, turning a missing or malformed file (or one holding a list,
    number, string or null) into a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; point edgelmm at an unmodified checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged, download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {json_type(data)}, not an object; the file is damaged, "
                              "download it again")
    return data
