"""Loading an open_clip model for the CLIP score and CLIP guidance, with its weights checked.

``load_clip`` takes an open_clip name ("ViT-B-32") with a tag or a weights file, a
``local-dir:<dir>`` open_clip folder, or ``genlab-digits`` (the domain CLIP for digits that
ships with genlab). Weights are never silently random: a missing file, an unknown tag or a
failed download raises ``WeightsNotFoundError`` naming the file or URL and the
``metrics.clip.*`` key that points at a local copy. Weights files are read with
``weights_only=True`` (a pickle holding more than tensors is refused, never run); one that
cannot be loaded is one ``WeightsFileError`` line naming it. The score itself is
``genlab.metrics.clip.CLIPScore``.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import open_clip.factory
import open_clip.pretrained
import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from torch import nn

from genlab.metrics.common import WeightsNotFoundError, sha256_file, sha256_state
from genlab.metrics.digits import load_weights_file, weights_error
from genlab.utils import ConfigError, reachable

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# models that ship with genlab (open_clip folders): name -> folder
BUNDLED = {"genlab-digits": Path(__file__).parent / "weights" / "digits_clip"}


def load_clip(
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    *,
    allow_random: bool = False,
    cache_dir: str | None = None,
    key: str = "metrics.clip",
) -> tuple[nn.Module, Any, dict]:
    """An open_clip model, its tokenizer and what a protocol records about it.

    ``model`` is an open_clip name ("ViT-B-32"), ``genlab-digits`` (the domain CLIP for digits
    that ships with genlab, trained by ``genlab.metrics.train_clip``), ``local-dir:<dir>`` or a
    plain path to such a
    directory (``open_clip_config.json`` with ``model_cfg``/``preprocess_cfg`` and a weights file,
    as in a hf-hub open_clip repo). ``pretrained`` is an open_clip tag ("openai",
    "laion2b_s34b_b79k") or a weights file for a built-in name, and is ignored for a directory.
    A tag is downloaded (into ``cache_dir``) as open_clip does; with a tag, the tag's QuickGELU
    flag and preprocessing (mean/std/interpolation/resize mode) are applied. A weights FILE for a
    built-in name uses that name's config as is: OpenAI weights need the ``-quickgelu`` name.

    Returns ``(clip_model, tokenizer, info)``: the model in eval mode on ``device`` with
    ``requires_grad`` off, and ``info`` = {model, pretrained, weights_file, weights_sha256 (of
    the weights file, or of the parameters when there is no file), image_size (int, or [H, W]),
    context_length, mean, std, interpolation, resize_mode}.

    Raises ``WeightsNotFoundError`` (one line: model, tag or file, where the weights come from,
    the ``<key>.*`` setting to fix; ``key`` is ``metrics.clip`` or ``guidance``) when the weights
    cannot be had. An empty
    ``pretrained`` for a built-in name raises too, unless ``allow_random`` (tests only).
    """
    model = str(model)
    if model in BUNDLED:  # genlab's domain CLIP for digits (genlab.metrics.train_clip)
        return _load_local_dir(BUNDLED[model], device, key)
    if model.startswith(HF_HUB):
        raise ConfigError(
            f"CLIP model {model}: hf-hub models are not downloaded by genlab; download the repo "
            f"(open_clip_config.json + weights) and set {key}.model=local-dir:<dir>"
        )
    if model.startswith(LOCAL_DIR):
        return _load_local_dir(Path(model[len(LOCAL_DIR) :]).expanduser(), device, key)
    name = model.replace("/", "-")  # open_clip accepts "ViT-B/32" for "ViT-B-32"
    if name in open_clip.list_models():
        return _load_builtin(name, pretrained, device, allow_random, cache_dir, key)
    path = Path(model).expanduser()
    if path.is_dir() or os.sep in model or model.startswith((".", "~")):
        return _load_local_dir(path, device, key)
    raise ConfigError(
        f"unknown CLIP model {model!r} ({key}.model): use an open_clip name "
        f"(open_clip.list_models(), e.g. ViT-B-32) or local-dir:<dir>"
    )


def _load_local_dir(
    directory: Path, device: str | torch.device, key: str
) -> tuple[nn.Module, Any, dict]:
    """An open_clip folder: config from ``open_clip_config.json``, weights from the folder."""
    fix = (
        "download an open_clip model folder (open_clip_config.json + open_clip_pytorch_model.bin, "
        "e.g. the hf-hub repo laion/CLIP-ViT-B-32-laion2B-s34B-b79K) and set "
        f"{key}.model=local-dir:<dir>"
    )
    if not directory.is_dir():
        raise WeightsNotFoundError(f"CLIP model directory {directory} not found: {fix}")
    if not (directory / "open_clip_config.json").is_file():
        raise WeightsNotFoundError(
            f"CLIP model directory {directory} has no open_clip_config.json: {fix}"
        )
    weights = _checkpoint_in_dir(directory)
    if weights is None:
        raise WeightsNotFoundError(
            f"CLIP model directory {directory} has no weights file "
            f"(*.safetensors, *.bin, *.pth; open_clip would initialise randomly): {fix}"
        )
    name = f"{LOCAL_DIR}{directory}"
    clip = _create_model(name, weights, fix, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    return _finish(clip, tokenizer, name, str(weights), weights, device)


def _checkpoint_in_dir(directory: Path) -> Path | None:
    """The weights file open_clip's ``local-dir:`` loader picks (its own helper when present)."""
    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
    if find is not None:
        found = find(directory)
        return Path(found) if found else None
    files = sorted(p for s in ("*.safetensors", "*.bin", "*.pth") for p in directory.glob(s))
    return files[0] if files else None


def _load_builtin(
    name: str,
    pretrained: str | None,
    device: str | torch.device,
    allow_random: bool,
    cache_dir: str | None,
    key: str,
) -> tuple[nn.Module, Any, dict]:
    """A built-in open_clip architecture with weights from a tag (downloaded) or a file."""
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    if not pretrained:
        if not allow_random:
            raise WeightsNotFoundError(
                f"CLIP {name}: no pretrained weights given ({key}.pretrained is empty) and "
                f"a random CLIP scores nothing: set {key}.pretrained to a tag ({tags}) or "
                f"to a weights file"
            )
        clip = open_clip.create_model(name, pretrained=None, device=device)
        return _finish(clip, open_clip.get_tokenizer(name), name, None, None, device)

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    quick_gelu, preprocess = False, {}
    if tag_cfg:
        weights = _download(name, pretrained, tag_cfg, cache_dir, key)
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        keys = ("mean", "std", "interpolation", "resize_mode")
        preprocess = {k: tag_cfg[k] for k in keys if k in tag_cfg}
    elif Path(pretrained).expanduser().is_file():
        weights = Path(pretrained).expanduser()
    else:
        raise WeightsNotFoundError(
            f"CLIP {name}: pretrained={pretrained} is neither a known open_clip tag ({tags}) nor "
            f"an existing weights file: download the weights and set "
            f"{key}.pretrained=<path to the file>"
        )
    # open_clip only warns when a tag wants QuickGELU and the config lacks it (ViT-B-32 +
    # openai): the model would run with the wrong activation, so force it as the tag says.
    clip = _create_model(
        name,
        weights,
        f"download the weights again and set {key}.pretrained=<path to the file>",
        pretrained=str(weights),
        device=device,
        force_quick_gelu=quick_gelu,
        force_preprocess_cfg=preprocess,
    )
    return _finish(clip, open_clip.get_tokenizer(name), name, pretrained, weights, device)


def _create_model(name: str, weights: Path, fix: str, **kwargs) -> nn.Module:
    """``open_clip.create_model`` with its weights file ``weights`` read safely: a pickle-format
    file is first read by genlab with ``weights_only=True`` (a crafted one is refused before
    open_clip opens it), open_clip is told ``weights_only=True`` too, and a file that cannot be
    loaded is one ``WeightsFileError`` line naming it and ``fix``."""
    what = f"CLIP {name}"
    if weights.suffix not in (".safetensors", ".npz", ".npy"):  # formats that hold no pickle
        load_weights_file(weights, what, fix)
    try:
        return open_clip.create_model(name, require_pretrained=True, weights_only=True, **kwargs)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise weights_error(what, weights, err, fix) from err


def _env_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now (huggingface_hub reads it once, at import:
    a process forked after the import, or one that set it later, would miss it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def hub_offline(offline: bool):
    """huggingface_hub's offline mode for the duration (files come from its cache or not at
    all): without it, a download with no network retries for about 45 s before it fails."""
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _download(name: str, tag: str, tag_cfg: dict, cache_dir: str | None, key: str) -> Path:
    """The weights file of an open_clip tag (cached or downloaded), or WeightsNotFoundError.
    When huggingface.co cannot be reached, only the local cache is tried (one line at once,
    not open_clip's 45 s of retries)."""
    # open_clip prefers the Hugging Face copy when huggingface_hub is installed (it is here)
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        source = f"https://huggingface.co/{repo}/resolve/main/{filename}"
    else:
        source = tag_cfg.get("url") or "(no download location known)"
    model_hint = ""
    if tag_cfg.get("quick_gelu") and not open_clip.get_model_config(name).get("quick_gelu"):
        if f"{name}-quickgelu" in open_clip.list_models():
            model_hint = f"{key}.model={name}-quickgelu "
    why_offline = None
    if tag_cfg.get("hf_hub"):
        if hub_constants.HF_HUB_OFFLINE or _env_offline():
            why_offline = "HF_HUB_OFFLINE is set"
        elif not reachable("huggingface.co"):
            why_offline = "huggingface.co cannot be reached"
    offline = why_offline is not None
    try:
        with hub_offline(offline):
            path = open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir)
        reason = "no download location"
    except Exception as err:  # no network, proxy, HTTP error: all mean "provide the file"
        path, reason = "", f"{type(err).__name__}: {err}".splitlines()[0][:160]
        if offline:
            reason = f"{why_offline} and the file is not in the Hugging Face cache"
    if not path or not Path(path).is_file():
        raise WeightsNotFoundError(
            f"CLIP weights {name}/{tag} could not be downloaded ({reason}): download {source} "
            f"and set {model_hint}{key}.pretrained=<path to the file>"
        )
    return Path(path)


def _finish(
    clip: nn.Module,
    tokenizer: Any,
    model: str,
    pretrained: str | None,
    weights: Path | None,
    device: str | torch.device,
) -> tuple[nn.Module, Any, dict]:
    """Freeze the model and describe it."""
    clip = clip.to(device).eval().requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(clip)
    size = pp.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    info = {
        "model": model,
        "pretrained": pretrained,
        "weights_file": str(weights) if weights is not None else None,
        "weights_sha256": sha256_file(weights) if weights is not None else sha256_state(clip),
        "image_size": h if h == w else [h, w],
        "context_length": int(tokenizer.context_length),
        "mean": [float(m) for m in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(s) for s in pp.get("std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
    }
    return clip, tokenizer, info


__all__ = ["BUNDLED", "load_clip"]
