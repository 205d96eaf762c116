"""Reading a checkpoint's JSON files (config, index, description) with typed errors; torch-free."""
from __future__ import annotations

import json
from pathlib import Path

from edgelmm.errors import CheckpointError


def read_json(path: Path) -> dict:
    """Parse a JSON file, turning a missing or malformed file into a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; point edgelmm at an unmodified checkpoint folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged, download it again") from None
