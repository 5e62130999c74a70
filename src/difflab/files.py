"""Reading and writing difflab's files safely: atomic writes, and readers that name the file and
say what is wrong with it (missing, empty, truncated, corrupt, not JSON) and what to do.

Every file difflab writes goes through :func:`write_atomic` / :func:`save_tensors` (a temporary
file, then a rename, so a crash never leaves half a file); every file it reads through
:func:`read_json` / :func:`load_tensors`. Nothing unpickles by default: only
:func:`load_pickled_tensors`, which a caller reaches when its user opted in (``allow_pickle=True``),
and then with torch's restricted unpickler (tensors and plain containers, no code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class FileError(ValueError):
    """A file difflab needs is missing or damaged; the message names it."""


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1).encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors, written atomically; channels-last and other strided tensors are saved contiguous."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileError(f"{path} does not exist ({what} expected there)")
    if path.stat().st_size == 0:
        raise FileError(f"{path} is empty: the {what} was not written completely. Write it again (or, for a "
                        "checkpoint, resume from the one before).")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file, or a :class:`FileError` naming it and what is wrong."""
    path = Path(path)
    _exists(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileError(f"{path} is not valid JSON ({err}); the {what} is damaged: write it again") from None


def load_tensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """A safetensors file, or a :class:`FileError` that says whether it is truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _exists(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        size = path.stat().st_size
        kind = "truncated" if "incomplete" in str(err).lower() or "size" in str(err).lower() else "corrupt"
        raise FileError(f"{path} ({size} bytes) is {kind}: not a readable safetensors file ({err}). The {what} "
                        "must be written again (or, for a checkpoint, resume from the one before).") from None


def load_pickled_tensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint (``.bin`` / ``.ckpt`` / ``.pt``), read with
    ``torch.load(weights_only=True)``: torch's restricted unpickler, which builds tensors and plain
    containers and refuses every other object, so no code in the file runs. A checkpoint whose
    weights sit under ``"state_dict"`` (latent diffusion's ``.ckpt``) gives those. Callers reach this
    only when the user opted in; the default is safetensors."""
    path = Path(path)
    _exists(path, what)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure (the restricted unpickler's refusal included): not safely readable
        raise FileError(f"{path} is not a pickle of plain tensors that can be read safely ({err}); convert it to "
                        "safetensors with a tool you trust") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise FileError(f"{path} holds no flat name -> tensor mapping (nor one under 'state_dict'); it is not {what}")
    return loaded


def load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names missing, unexpected and mis-shaped weights."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"wrong shapes {len(shapes)} (e.g. {'; '.join(shapes[:3])})")
        raise ValueError(f"the weights in {source} do not match the network's config: {', '.join(parts)}")
    net.load_state_dict(state)


class OutputExistsError(FileError):
    """An output folder already holds results; difflab does not overwrite them unasked."""


def claim_output(directory: str | os.PathLike, patterns: tuple[str, ...], *, overwrite: bool, what: str,
                 how: str = "--overwrite") -> Path:
    """Make ``directory`` ready for new results: refuse one that is not empty unless ``overwrite``;
    then remove what an earlier run wrote there (the entries matching ``patterns``), so results of
    two runs never mix. Other files are left alone."""
    import shutil

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} is a file, not a folder for the {what}")
    entries = sorted(directory.iterdir()) if directory.is_dir() else []
    if entries and not overwrite:
        names = ", ".join(e.name for e in entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise OutputExistsError(f"{directory} already holds files ({names}); the {what} would mix with or replace "
                                f"them. Choose another folder, or pass {how} to replace earlier results.")
    for pattern in patterns:
        for entry in directory.glob(pattern) if directory.is_dir() else []:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


#: the PNG text chunk that carries an image's settings record (the JSON `difflab sample` writes beside it)
PNG_SETTINGS_KEY = "difflab"


def png_bytes(image: Any, settings: dict[str, Any] | None = None) -> bytes:
    """A PIL image as PNG bytes with its settings record in a text chunk; the same image and
    settings always give the same bytes (no time stamp is written)."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text(PNG_SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """An image's settings record: its JSON file, or the record inside a PNG that difflab wrote."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        return read_json(path, "settings record")
    _exists(path, "PNG image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = image.text.get(PNG_SETTINGS_KEY) if hasattr(image, "text") else None
    except (UnidentifiedImageError, OSError) as err:
        raise FileError(f"{path} is not a readable PNG ({err})") from None
    if text is None:
        raise FileError(f"{path} carries no difflab settings: only PNGs written by difflab (`difflab sample`, "
                        "`difflab serve`) do. Give its NNNNN.json instead, if there is one.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileError(f"{path}: its difflab settings are not valid JSON ({err})") from None
