"""Reading bundles: check a bundle folder or archive against its SHA256SUMS, unpack archives safely, rebuild the model."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import torch.nn as nn
from safetensors.torch import load_file

from dse.deploy.bundle import predict as runtime
from dse.deploy.front import DeployError
from dse.models import ModelConfig, build_model

__all__ = ["load_bundle_model", "unpack_bundle", "verify_bundle"]


def verify_bundle(bundle: str | os.PathLike) -> dict:
    """Check every file of a bundle, its folder or the .tar.gz export wrote, against SHA256SUMS and meta.json;
    return the meta or raise DeployError. An archive is unpacked into a temporary folder first (`unpack_bundle`)."""
    if not Path(bundle).is_file():
        return _verify_folder(Path(bundle), str(bundle))
    with tempfile.TemporaryDirectory(prefix="dse-verify-") as tmp:
        return _verify_folder(unpack_bundle(Path(bundle), Path(tmp)), str(bundle))


def _verify_folder(folder: Path, shown: str) -> dict:
    """`runtime.verify` of `folder`, its errors naming `shown` (the archive, not the temporary folder)."""
    try:
        return runtime.verify(str(folder))
    except runtime.BundleError as e:
        raise DeployError(str(e).replace(str(folder), shown)) from None
    except (OSError, ValueError, KeyError) as e:
        raise DeployError(f"{shown} is not a readable bundle ({type(e).__name__}: {e})") from None


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member that could write outside the folder it is unpacked into, or is not a file or a folder."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise DeployError(
            f"{archive}: member {member.name!r} is an absolute path or climbs out with '..'; a bundle "
            "archive holds relative paths only"
        )
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "not a file or a folder"
        raise DeployError(f"{archive}: member {member.name!r} is {kind}; a bundle archive holds files and folders only")


def unpack_bundle(archive: Path, into: Path) -> Path:
    """Unpack a bundle archive (.tar.gz) into the folder `into`, refusing absolute paths, '..', links and special
    files; return the bundle's folder (the archive's one top folder, else `into`)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DeployError(
            f"{archive} is neither a bundle folder nor a readable bundle archive (.tar.gz): {e}"
        ) from None
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    top = into / tops.pop() if len(tops) == 1 else into
    return top if top.is_dir() else into


def load_bundle_model(folder: str | os.PathLike) -> nn.Module:
    """The PyTorch model of a bundle, rebuilt with dse from config.json and weights.safetensors (checked)."""
    verify_bundle(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    model = build_model(
        ModelConfig(**config["model"]), num_classes=config["num_classes"], in_channels=config["in_channels"]
    )
    model.load_state_dict(load_file(str(Path(folder) / "weights.safetensors")))
    return model.eval()
