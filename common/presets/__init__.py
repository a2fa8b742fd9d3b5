"""Ready study protocols shipped with MyeloFed (TOML files beside this module)."""

from __future__ import annotations

from pathlib import Path

from common.errors import ConfigError

PRESET_DIR = Path(__file__).parent


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the first comment line of the file)."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.toml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        out[path.stem] = first.lstrip("# ").strip()
    return out


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"preset:{name}", [f"no such preset; known: {', '.join(list_presets())}"])
    return path
