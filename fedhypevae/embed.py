"""Turn images into frozen foundation-model embeddings: ``fedhypevae embed``.

FedHypeVAE trains on embeddings, not pixels. This module reads an image folder
(``root/<class>/*.png``, classes numbered by sorted folder name) or a MedMNIST ``.npz``
(``train_images``/``train_labels``, ``val_*``, ``test_*``), preprocesses in torch (no
torchvision), runs a frozen encoder in eval mode without gradients, and writes an ``.npz``
with ``x`` float32 (N, D), ``y`` int64 (N,), ``split`` (train/val/test, or "all" for a
folder) and ``meta`` (a JSON string), plus a ``<output>.json`` sidecar with the same
metadata. The result loads with ``fedhypevae.data.load_dataset``.

Encoders (``load_encoder``), all returning the CLS token / pooled output:

- ``hub``:   ``dinov2_vits14`` etc. via ``torch.hub`` (``facebookresearch/dinov2``, or a local clone);
- ``timm``:  ``vit_small_patch14_dinov2.lvd142m`` (``pip install timm``);
- ``hf``:    ``facebook/dinov2-small`` via transformers ``AutoModel`` (``pip install transformers``);
- ``local``: a file holding the whole model: TorchScript, a ``torch.export`` ``.pt2``, or a
  ``torch.save``d ``nn.Module``. The last is unpickled with ``weights_only=False``, which runs
  code from the file: only load files you trust (your own).

Offline clusters: fetch weights on a machine with network access, then pass ``--weights PATH``
(a state dict for hub/timm, a ``save_pretrained`` directory for hf) or ``--source local``.

    fedhypevae embed ../shared/data/medmnist/breastmnist.npz out/breast_dinov2.npz --model dinov2_vits14
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .atomic import atomic_savez, atomic_write_text
from .checkpoint import dumps_json
from .errors import DataError, FedHypeVAEError

SOURCES = ("auto", "hub", "timm", "hf", "local")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MEDMNIST_SPLITS = ("train", "val", "test")  # the order load_dataset concatenates them in
DEFAULT_HUB_REPO = "facebookresearch/dinov2"
_HUB_NAME = re.compile(r"^dinov2_vit[sblg]14(_reg)?(_lc)?$")
PathLike = str | os.PathLike


class ModelLoadError(FedHypeVAEError):
    """An encoder could not be built or its weights could not be fetched or read."""


# ------------------------------------------------------------------------------------ encoders


class Encoder(nn.Module):
    """A frozen backbone: (B, 3, H, W) ImageNet-normalised floats -> (B, D) float32 embeddings."""

    def __init__(self, backbone: nn.Module, *, name: str, source: str, patch_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        for p in backbone.parameters():  # a loop, not requires_grad_(): ScriptModules refuse the latter
            p.requires_grad_(False)
        self.name, self.source, self.patch_size = name, source, patch_size
        self.train(False)

    def train(self, mode: bool = True) -> Encoder:  # frozen: dropout / batch-norm stay in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pool_output(self.backbone(images)).float()


def pool_output(out) -> torch.Tensor:
    """The per-image vector of any backbone output: CLS token, pooled output, or a (B, D) tensor."""
    if isinstance(out, torch.Tensor):
        if out.ndim == 2:
            return out
        if out.ndim == 3:  # (B, tokens, D): token 0 is CLS
            return out[:, 0]
        if out.ndim == 4:  # (B, C, h, w) feature map: global average pool
            return out.mean(dim=(2, 3))
        raise ModelLoadError(
            f"the encoder returned a tensor of shape {tuple(out.shape)}; expected (B, D), "
            "(B, tokens, D) or (B, C, h, w)"
        )
    pooled = getattr(out, "pooler_output", None)  # transformers ModelOutput
    if isinstance(pooled, torch.Tensor):
        return pooled
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden[:, 0]
    if isinstance(out, dict):
        for key in ("x_norm_clstoken", "pooler_output", "last_hidden_state", "x", "features"):
            if key in out:
                return pool_output(out[key])
    if isinstance(out, (tuple, list)) and out:
        return pool_output(out[0])
    raise ModelLoadError(f"cannot find an embedding in the encoder output of type {type(out).__name__}")


def resolve_source(name: str, source: str = "auto") -> str:
    """``auto``: an existing file -> local, ``org/model`` -> hf, ``dinov2_vit?14`` -> hub, else timm."""
    if source not in SOURCES:
        raise ModelLoadError(f"unknown encoder source {source!r}; valid: {', '.join(SOURCES)}")
    if source != "auto":
        return source
    if Path(name).is_file():
        return "local"
    if _HUB_NAME.match(name):
        return "hub"
    if "/" in name:
        return "hf"
    return "timm"


def load_encoder(
    name: str,
    *,
    source: str = "auto",
    weights: PathLike | None = None,
    device: str | torch.device = "cpu",
    hub_repo: str = DEFAULT_HUB_REPO,
    image_size: int | None = None,
) -> Encoder:
    """Build the frozen encoder ``name`` from ``source`` on ``device``; see the module docstring.

    ``weights`` is a local file/directory used instead of a download. ``image_size`` is passed to
    timm so position embeddings match the input. Failures raise ``ModelLoadError`` saying what to do.
    """
    src = resolve_source(name, source)
    if weights is not None and not Path(weights).exists():
        raise ModelLoadError(f"--weights {weights} does not exist; give the path of the downloaded weights")
    loader = {"hub": _load_hub, "timm": _load_timm, "hf": _load_hf, "local": _load_local}[src]
    backbone, patch = loader(name, weights=weights, hub_repo=hub_repo, image_size=image_size)
    return Encoder(backbone, name=name, source=src, patch_size=patch).to(_device(device))


def _offline_hint(src: str, name: str, exc: BaseException) -> ModelLoadError:
    what = f"{type(exc).__name__}: {exc}"
    if _looks_offline(exc):
        return ModelLoadError(
            f"cannot fetch model {name!r} from {src} ({what}). With no network access to the model hub, download "
            "the weights on a machine with access and pass --weights PATH, or save the whole model with "
            "torch.save / torch.jit and use --source local --model FILE"
        )
    return ModelLoadError(f"cannot load model {name!r} from {src} ({what}); check the model name and --weights")


_OFFLINE_WORDS = (
    "internet connection",
    "network",
    "connect",
    "name or service not known",
    "resolve host",
    "getaddrinfo",
    "urlopen",
    "timed out",
    "offline",
)


def _looks_offline(exc: BaseException) -> bool:
    """URLError/HTTPError/socket errors are OSErrors; torch hub says 'no internet connection' in a RuntimeError."""
    for _ in range(10):  # the cause chain, bounded
        if exc is None:
            return False
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
            return True
        if any(w in str(exc).lower() for w in _OFFLINE_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _state_dict(path: PathLike, src: str, name: str) -> dict:
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file  # installed with timm / transformers

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read --weights {path} for {src} model {name!r} as a state dict "
            f"({type(exc).__name__}: {exc}); for a whole saved model use --source local"
        ) from None
    for key in ("model", "state_dict", "teacher"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"--weights {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_sd_into(model: nn.Module, path: PathLike, src: str, name: str) -> None:
    try:
        model.load_state_dict(_state_dict(path, src, name), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"--weights {path} do not fit {src} model {name!r}: {str(exc)[:400]}") from None


def _load_hub(name, *, weights, hub_repo, image_size):
    local_repo = Path(hub_repo).is_dir()
    try:
        model = torch.hub.load(
            hub_repo,
            name,
            source="local" if local_repo else "github",
            pretrained=weights is None,
            **({} if local_repo else {"trust_repo": True}),
        )
    except Exception as exc:
        err = _offline_hint("torch hub", name, exc)
        raise ModelLoadError(
            f"{err} (torch hub also needs the code of {hub_repo}: pass --hub-repo DIR, a clone "
            "of https://github.com/facebookresearch/dinov2, when offline)"
        ) from None
    if weights is not None:
        _load_sd_into(model, weights, "torch hub", name)
    return model, 14


def _load_timm(name, *, weights, hub_repo, image_size):
    try:
        import timm
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} needs timm, which is not installed: pip install timm "
            "(or pip install 'fedhypevae-hpc[embed]')"
        ) from None
    kwargs = {"num_classes": 0}  # num_classes=0: the pooled (CLS for DINOv2) features, no head
    if image_size is not None and "patch" in name:
        kwargs["img_size"] = image_size  # resample position embeddings to the input size
    if weights is not None:  # timm's own loader: its checkpoint filter resamples position embeddings
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise _offline_hint("timm", name, exc) from None
    m = re.search(r"patch(\d+)", name)
    return model, int(m.group(1)) if m else None


def _load_hf(name, *, weights, hub_repo, image_size):
    try:
        from transformers import AutoModel
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} needs transformers, which is not installed: pip install transformers "
            "(or pip install 'fedhypevae-hpc[embed]')"
        ) from None
    where = str(weights) if weights is not None else name
    try:
        model = AutoModel.from_pretrained(where, local_files_only=weights is not None)
    except Exception as exc:
        raise _offline_hint("Hugging Face", name, exc) from None
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    return model, patch if isinstance(patch, int) else None


def _load_local(name, *, weights, hub_repo, image_size):
    path = Path(weights if weights is not None else name)
    if not path.is_file():
        raise ModelLoadError(
            f"--source local needs a model file; {path} does not exist (pass it as --model FILE or --weights FILE)"
        )
    try:
        members = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        with warnings.catch_warnings():  # torch.jit is deprecated but TorchScript files are still common
            warnings.simplefilter("ignore")
            if any(m.endswith("/constants.pkl") for m in members):
                model = torch.jit.load(str(path), map_location="cpu")
            elif any(m.endswith("models/model.json") for m in members):
                model = torch.export.load(str(path)).module()
            else:  # a pickled nn.Module: runs code from the file, so trusted files only (documented)
                model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load local model {path} ({type(exc).__name__}: {exc}); expected TorchScript, "
            "a torch.export .pt2, or a torch.save'd nn.Module"
        ) from None
    if isinstance(model, dict):
        raise ModelLoadError(
            f"{path} holds a state dict, not a model; pass it as --weights with --source "
            "hub/timm/hf and the architecture's --model name"
        )
    if not callable(model):
        raise ModelLoadError(f"{path} holds a {type(model).__name__}, not a callable model")
    if not isinstance(model, nn.Module):
        model = _Wrap(model)
    return model, None


class _Wrap(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _device(device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedHypeVAEError(f"--device {device} was requested but torch.cuda.is_available() is false")
    return dev


# ------------------------------------------------------------------------------- preprocessing


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _to_float_rgb(arr: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) grey or (B, H, W, 3) RGB -> float (B, 3, H, W) in [0, 1]."""
    t = torch.from_numpy(np.require(arr, requirements=["C", "W"]))  # copies only read-only/strided input
    scale = 255.0 if arr.dtype == np.uint8 else 1.0  # float images are taken to be in [0, 1] already
    t = t.float() / scale
    if t.ndim == 3:
        t = t.unsqueeze(1).expand(-1, 3, -1, -1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2).expand(-1, 3, -1, -1) if t.shape[-1] == 1 else t.permute(0, 3, 1, 2)
    else:
        raise DataError(f"images must be (N, H, W) grey or (N, H, W, 3) RGB; got shape {tuple(arr.shape)}")
    return t


def preprocess_array(arr: np.ndarray, image_size: int = 224) -> torch.Tensor:
    """MedMNIST-style batch -> (B, 3, S, S): bilinear resize (antialiased when shrinking), normalise."""
    t = _to_float_rgb(arr)
    if t.shape[-2:] != (image_size, image_size):
        shrink = t.shape[-1] > image_size or t.shape[-2] > image_size
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
    return normalize(t).contiguous()


def preprocess_pil(img, image_size: int = 224, resize: int | None = None) -> torch.Tensor:
    """One PIL image -> (3, S, S): RGB, shorter side to ``resize`` (default S*256/224), centre crop S, normalise."""
    resize = resize or round(image_size * 256 / 224)
    t = _to_float_rgb(np.asarray(img.convert("RGB"))[None])
    h, w = t.shape[-2:]
    nh, nw = (resize, max(resize, round(w * resize / h))) if h <= w else (max(resize, round(h * resize / w)), resize)
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=(nh < h or nw < w))
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    return normalize(t[:, :, top : top + image_size, left : left + image_size])[0].contiguous()


# ---------------------------------------------------------------------------------------- inputs


@dataclass
class Records:
    """What to embed: a batch function over row indices, labels, splits and a description."""

    n: int
    y: np.ndarray
    split: np.ndarray
    names: np.ndarray | None  # file names for folders, None for arrays
    classes: list | None
    kind: str
    batch: Callable[[Sequence[int]], torch.Tensor]


def read_input(path: PathLike, *, image_size: int = 224, resize: int | None = None) -> Records:
    p = Path(path)
    if not p.exists():
        raise DataError(f"input {p} does not exist; give an image folder (one subfolder per class) or a MedMNIST .npz")
    if p.is_dir():
        return _folder(p, image_size, resize)
    if p.suffix.lower() == ".npz":
        return _medmnist(p, image_size)
    raise DataError(
        f"input {p} is neither a folder nor a .npz; give an image folder (one subfolder per class) or a MedMNIST .npz"
    )


def _folder(root: Path, image_size: int, resize: int | None) -> Records:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class subfolders; expected {root}/<class>/<image> "
            "(classes are numbered by sorted folder name)"
        )
    files, labels = [], []
    for k, c in enumerate(classes):
        found = sorted(f for f in (root / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [k] * len(found)
    if not files:
        raise DataError(
            f"image folder {root} has class folders {classes[:10]} but no images ({', '.join(IMAGE_EXTENSIONS)})"
        )

    def batch(idx: Sequence[int]) -> torch.Tensor:
        return torch.stack([_read_image(files[i], image_size, resize) for i in idx])

    names = np.array([str(f.relative_to(root)) for f in files])
    return Records(
        len(files), np.asarray(labels, dtype=np.int64), np.full(len(files), "all"), names, classes, "folder", batch
    )


def _read_image(f: Path, image_size: int, resize: int | None) -> torch.Tensor:
    from PIL import Image  # pillow comes with matplotlib, a required dependency

    try:
        with Image.open(f) as img:
            return preprocess_pil(img, image_size, resize)
    except Exception as exc:
        raise DataError(f"cannot read image {f} ({type(exc).__name__}: {exc}); remove or replace it") from None


def _medmnist(p: Path, image_size: int) -> Records:
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
            if not splits:
                raise DataError(
                    f"{p}: expected MedMNIST keys train_images/train_labels (and val_*, test_*); found {sorted(keys)}"
                )
            xs = [z[f"{s}_images"] for s in splits]
            ys = [z[f"{s}_labels"] for s in splits]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {p} ({type(exc).__name__}: {exc}); re-create or re-download it") from None
    for s, xi, yi in zip(splits, xs, ys):
        if yi.ndim == 2 and yi.shape[1] != 1:
            raise DataError(
                f"{p}: {s}_labels has shape {yi.shape}: multi-label data sets (e.g. ChestMNIST) "
                "are not supported; labels must be one class id per image"
            )
        if len(xi) != len(yi):
            raise DataError(f"{p}: {s}_images has {len(xi)} rows but {s}_labels has {len(yi)}")
        if xi.ndim not in (3, 4) or (xi.ndim == 4 and xi.shape[-1] not in (1, 3)):
            raise DataError(f"{p}: {s}_images must be (N, H, W) grey or (N, H, W, 3) RGB; got {xi.shape}")
    if len({xi.shape[1:] for xi in xs}) > 1:
        raise DataError(f"{p}: image shapes differ across splits {[xi.shape for xi in xs]}")
    x = np.concatenate(xs)
    y = np.concatenate([yi.reshape(-1) for yi in ys]).astype(np.int64)
    split = np.concatenate([np.full(len(xi), s) for s, xi in zip(splits, xs)])
    if len(x) == 0:
        raise DataError(f"{p}: contains no images")

    def batch(idx: Sequence[int]) -> torch.Tensor:
        return preprocess_array(x[np.asarray(idx)], image_size)

    return Records(len(x), y, split, None, None, "medmnist", batch)


# ------------------------------------------------------------------------------------- extraction


def extract(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    records: Records,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Run ``encoder`` over ``records`` in batches; returns float32 (N, D)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise FedHypeVAEError(f"batch size must be >= 1; got {batch_size}")
    dev = _device(device)
    out = []
    with tqdm(total=records.n, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, records.n, batch_size):
            idx = range(start, min(start + batch_size, records.n))
            imgs = records.batch(idx).to(dev, non_blocking=True)
            with torch.no_grad():
                emb = pool_output(encoder(imgs))
            if emb.ndim != 2 or emb.shape[0] != len(idx):
                raise ModelLoadError(
                    f"the encoder mapped a batch of {len(idx)} images to shape {tuple(emb.shape)}; "
                    "expected (batch, dim)"
                )
            out.append(emb.float().cpu().numpy())  # a device->host sync per batch; fine next to the forward pass
            bar.update(len(idx))
    x = np.concatenate(out).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ModelLoadError("the encoder produced non-finite embeddings; check the weights and --image-size")
    return x


def embed(
    input_path: PathLike,
    output_path: PathLike,
    *,
    model: str,
    source: str = "auto",
    weights: PathLike | None = None,
    batch_size: int = 64,
    image_size: int = 224,
    resize: int | None = None,
    device: str = "auto",
    limit: int | None = None,
    hub_repo: str = DEFAULT_HUB_REPO,
    progress: bool = True,
) -> dict:
    """Embed every image under ``input_path`` with ``model``; write ``output_path`` (.npz) and a .json sidecar.

    ``limit`` keeps the first N records (in file order: class by class for folders, train/val/test
    for MedMNIST). Returns a summary dict (also the sidecar's content, plus timing).
    """
    out = Path(output_path)
    if out.suffix.lower() != ".npz":
        raise FedHypeVAEError(f"output {out} must end in .npz")
    if image_size < 1:
        raise FedHypeVAEError(f"--image-size must be positive; got {image_size}")
    records = read_input(input_path, image_size=image_size, resize=resize)
    if limit is not None:
        if limit < 1:
            raise FedHypeVAEError(f"--limit must be >= 1; got {limit}")
        records = _head(records, limit)
    dev = _device(device)
    encoder = load_encoder(model, source=source, weights=weights, device=dev, hub_repo=hub_repo, image_size=image_size)
    patch = encoder.patch_size
    if patch and image_size % patch:
        raise FedHypeVAEError(
            f"--image-size {image_size} is not a multiple of the patch size {patch} of {model!r}; "
            f"use e.g. {max(image_size // patch, 1) * patch}"
        )
    t0 = time.perf_counter()
    x = extract(encoder, records, batch_size=batch_size, device=dev, progress=progress)
    seconds = time.perf_counter() - t0
    meta = {
        "model": model,
        "source": encoder.source,
        "weights": None if weights is None else str(weights),
        "input": str(input_path),
        "input_kind": records.kind,
        "image_size": image_size,
        "resize": (resize or round(image_size * 256 / 224)) if records.kind == "folder" else None,
        "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "n": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "classes": records.classes,
        "num_classes": int(records.y.max()) + 1,
        "splits": {str(s): int(c) for s, c in zip(*np.unique(records.split, return_counts=True))},
    }
    arrays = {"x": x, "y": records.y, "split": records.split, "meta": np.array(json.dumps(meta))}
    if records.names is not None:
        arrays["path"] = records.names
    atomic_savez(out, arrays, owner_only=True)
    atomic_write_text(out.with_suffix(".json"), dumps_json(meta, indent=2) + "\n", owner_only=True)
    return {
        **meta,
        "output": str(out),
        "device": str(dev),
        "seconds": round(seconds, 3),
        "images_per_s": round(x.shape[0] / seconds, 1) if seconds > 0 else None,
    }


def _head(r: Records, n: int) -> Records:
    n = min(n, r.n)
    return Records(n, r.y[:n], r.split[:n], None if r.names is None else r.names[:n], r.classes, r.kind, r.batch)
