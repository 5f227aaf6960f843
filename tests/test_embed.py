"""`fedhypevae embed` offline: a tiny locally built encoder stands in for DINOv2 (no model hub here)."""

import builtins
import json
import sys
import types
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fedhypevae.data import load_dataset
from fedhypevae.embed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    ModelLoadError,
    embed,
    load_encoder,
    pool_output,
    preprocess_array,
    preprocess_pil,
    read_input,
    resolve_source,
)
from fedhypevae.errors import DataError, FedHypeVAEError

Image = pytest.importorskip("PIL.Image")
SIZE = 28  # small images keep the suite fast; the real default is 224


class TinyViT(nn.Module):
    """Patchify -> tokens with a CLS token -> (B, tokens, D): exercises the CLS pooling path."""

    def __init__(self, dim: int = 8, patch: int = 7):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.5)  # must be inactive: the encoder is frozen in eval mode

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        return self.drop(torch.tanh(self.mix(t + t.mean(1, keepdim=True))))


def _tiny_conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    m = TinyViT()
    path = tmp_path / "tiny.pt"
    torch.save(m, path)
    return path, m.eval()


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("benign", "malignant"):  # sorted -> benign 0, malignant 1
        (root / c).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(30 + 4 * i, 36, 3), dtype=np.uint8)
            mode_img = Image.fromarray(arr)
            if i == 1:
                mode_img = mode_img.convert("L")  # grey files are converted to RGB
            mode_img.save(root / c / f"im{i}.png")
    return root


@pytest.fixture
def medmnist_npz(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "tinymnist.npz"
    np.savez(
        p,
        train_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0], [1], [1]]),
        val_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        val_labels=np.array([[1], [0]]),
        test_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        test_labels=np.array([[0], [1], [1]]),
    )
    return p


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_constant_colour_matches_imagenet_normalisation():
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    t = preprocess_pil(img, image_size=SIZE)
    assert t.shape == (3, SIZE, SIZE)
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(t, want.view(3, 1, 1).expand(3, SIZE, SIZE), atol=1e-5, rtol=0)
    grey = preprocess_array(np.full((2, 28, 28), 128, np.uint8), image_size=42)
    assert grey.shape == (2, 3, 42, 42)
    want = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(grey[1, :, 5, 7], want.float(), atol=1e-5, rtol=0)
    rgb = preprocess_array(np.zeros((1, 28, 28, 3), np.uint8), image_size=SIZE)  # same size: no resampling
    assert rgb.shape == (1, 3, SIZE, SIZE)


def test_pool_output_shapes():
    assert pool_output(torch.ones(2, 5)).shape == (2, 5)
    assert torch.equal(pool_output(torch.arange(24.0).view(2, 3, 4)), torch.arange(24.0).view(2, 3, 4)[:, 0])
    assert pool_output(torch.ones(2, 6, 3, 3)).shape == (2, 6)
    assert pool_output({"x_norm_clstoken": torch.ones(2, 4)}).shape == (2, 4)
    assert pool_output((torch.ones(2, 4), None)).shape == (2, 4)


# --------------------------------------------------------------------------------- extraction


def test_folder_embed_matches_manual_forward_and_loads(tmp_path, model_file, image_folder):
    path, module = model_file
    out = tmp_path / "out" / "emb.npz"
    s = embed(
        image_folder, out, model=str(path), source="local", batch_size=4, image_size=SIZE, device="cpu", progress=False
    )
    assert s["n"] == 6 and s["dim"] == 8 and s["classes"] == ["benign", "malignant"] and s["splits"] == {"all": 6}
    with np.load(out, allow_pickle=False) as z:
        x, y, split = z["x"], z["y"], z["split"]
        assert json.loads(str(z["meta"]))["source"] == "local"
        assert list(z["path"]) == [f"{c}/im{i}.png" for c in ("benign", "malignant") for i in range(3)]
    assert x.dtype == np.float32 and x.shape == (6, 8) and y.dtype == np.int64
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and set(split) == {"all"}
    recs = read_input(image_folder, image_size=SIZE)
    with torch.no_grad():
        by_hand = module(recs.batch(range(6)))[:, 0].numpy()  # CLS token of the module applied by hand
    np.testing.assert_allclose(x, by_hand, rtol=1e-5, atol=1e-6)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model"] == str(path) and sidecar["image_size"] == SIZE
    out2 = tmp_path / "emb2.npz"  # deterministic, and independent of the batch size
    embed(
        image_folder,
        out2,
        model="ignored",
        source="local",
        weights=path,
        batch_size=1,
        image_size=SIZE,
        device="cpu",
        progress=False,
    )
    np.testing.assert_allclose(np.load(out2)["x"], x, rtol=1e-5, atol=1e-6)
    ds = load_dataset(out)
    assert ds.x.shape == (6, 8) and ds.num_classes == 2 and ds.y.tolist() == y.tolist()
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temp file


def test_medmnist_embed_torchscript_splits_in_loader_order(tmp_path, medmnist_npz):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        scripted = torch.jit.script(_tiny_conv().eval())
    path = tmp_path / "tiny_ts.pt"
    scripted.save(str(path))
    out = tmp_path / "med.npz"
    s = embed(medmnist_npz, out, model=str(path), batch_size=3, image_size=SIZE, device="cpu", progress=False)
    assert s["source"] == "local" and s["splits"] == {"test": 3, "train": 5, "val": 2}
    z = np.load(out)
    assert z["x"].shape == (10, 4) and z["split"].tolist() == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    ds = load_dataset(out)
    np.testing.assert_array_equal(ds.y, load_dataset(medmnist_npz).y)  # same row order as the raw loader
    raw = np.load(medmnist_npz)
    with torch.no_grad():
        by_hand = scripted(preprocess_array(raw["val_images"], SIZE)).numpy()
    np.testing.assert_allclose(z["x"][5:7], by_hand, rtol=1e-5, atol=1e-6)
    limited = embed(
        medmnist_npz, tmp_path / "lim.npz", model=str(path), image_size=SIZE, device="cpu", progress=False, limit=4
    )
    assert limited["n"] == 4 and np.load(tmp_path / "lim.npz")["x"].shape == (4, 4)


def test_encoder_is_frozen(model_file):
    path, _ = model_file
    enc = load_encoder(str(path), source="local", device="cpu")
    assert isinstance(enc, Encoder) and not enc.training
    enc.train()
    assert not enc.training and not enc.backbone.training
    x = torch.randn(2, 3, SIZE, SIZE)
    out = enc(x)
    assert out.shape == (2, 8) and not out.requires_grad
    torch.testing.assert_close(out, enc(x))


# ------------------------------------------------------------------------------------- errors


def test_input_errors(tmp_path, model_file, image_folder):
    path, _ = model_file
    kw = dict(model=str(path), source="local", image_size=SIZE, device="cpu", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        embed(tmp_path / "nope", tmp_path / "o.npz", **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        embed(tmp_path / "empty", tmp_path / "o.npz", **kw)
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        embed(tmp_path / "empty", tmp_path / "o.npz", **kw)
    bad = image_folder / "malignant" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        embed(image_folder, tmp_path / "o.npz", **kw)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="train_images"):
        embed(tmp_path / "wrong.npz", tmp_path / "o.npz", **kw)
    assert not (tmp_path / "o.npz").exists()


def test_local_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_encoder(str(tmp_path / "missing.pt"), source="local")
    torch.save(_tiny_conv().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="state dict"):
        load_encoder(str(tmp_path / "sd.pt"), source="local")
    with pytest.raises(ModelLoadError, match="valid: auto, hub, timm, hf, local"):
        load_encoder("x", source="onnx")


def test_resolve_source(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    assert resolve_source(str(tmp_path / "m.pt")) == "local"
    assert resolve_source("dinov2_vits14") == "hub" and resolve_source("dinov2_vitl14_reg") == "hub"
    assert resolve_source("facebook/dinov2-small") == "hf"
    assert resolve_source("vit_small_patch14_dinov2.lvd142m") == "timm"


@pytest.mark.parametrize(
    "exc",
    [
        urllib.error.URLError(OSError(101, "Network is unreachable")),  # the weights download
        RuntimeError("It looks like there is no internet connection and the repo could not be found in the cache"),
    ],
)
def test_hub_offline_gives_clear_error(monkeypatch, exc):
    calls = []

    def offline(*args, **kwargs):  # what torch.hub does on a machine without network
        calls.append((args, kwargs))
        raise exc

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(FedHypeVAEError, match=r"(?s)dinov2_vits14.*torch hub.*no network access.*--weights PATH"):
        load_encoder("dinov2_vits14", source="auto", device="cpu")
    assert calls[0][0][:2] == ("facebookresearch/dinov2", "dinov2_vits14") and calls[0][1]["pretrained"] is True


@pytest.mark.parametrize(
    "name,source,package",
    [("vit_small_patch14_dinov2.lvd142m", "timm", "timm"), ("facebook/dinov2-small", "hf", "transformers")],
)
def test_missing_optional_package_says_pip_install(monkeypatch, name, source, package):
    real_import = builtins.__import__

    def no_package(mod, *args, **kwargs):
        if mod == package or mod.startswith(package + "."):
            raise ImportError(f"No module named {mod!r}")
        return real_import(mod, *args, **kwargs)

    monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(FedHypeVAEError, match=f"pip install {package}"):
        load_encoder(name, source=source, device="cpu")


def test_patch_size_and_output_checks(tmp_path, model_file, medmnist_npz):
    path, _ = model_file
    with pytest.raises(FedHypeVAEError, match=r"\.npz"):
        embed(medmnist_npz, tmp_path / "o.csv", model=str(path), source="local", progress=False)
    enc = load_encoder(str(path), source="local")
    assert enc.patch_size is None  # unknown for a local file: any size is passed through


def test_hub_local_repo_with_state_dict_weights(tmp_path):
    """--hub-repo DIR (a clone of the dinov2 repo) + --weights STATE_DICT: the offline hub route."""
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import torch.nn as nn\n"
        "def dinov2_vits14(pretrained=True):\n"
        "    assert not pretrained, 'would download'\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 14, stride=14), nn.Flatten(2), nn.Linear(4, 1), nn.Flatten())\n"
    )
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 5, 14, stride=14), nn.Flatten(2), nn.Linear(4, 1), nn.Flatten()).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    enc = load_encoder("dinov2_vits14", hub_repo=str(repo), weights=tmp_path / "w.pth", device="cpu")
    assert enc.source == "hub" and enc.patch_size == 14
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x))
    torch.save({"other": torch.ones(1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_encoder("dinov2_vits14", hub_repo=str(repo), weights=tmp_path / "bad.pth")


def test_timm_and_hf_paths_with_stand_in_packages(monkeypatch, tmp_path):
    """The real packages are optional and absent here: stand-ins check the calls and the pooling."""
    seen = {}

    class FakeTimm(types.ModuleType):
        @staticmethod
        def create_model(name, pretrained, **kwargs):
            seen["timm"] = (name, pretrained, kwargs)
            return _tiny_conv()

    class HFOut:
        def __init__(self, h):
            self.last_hidden_state, self.pooler_output = h, None  # no pooler: CLS of the last hidden state

    class FakeHFModel(nn.Module):
        config = types.SimpleNamespace(patch_size=14)

        def forward(self, x):
            return HFOut(torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)[:, None].repeat(1, 3, 1))

    fake_tf = types.ModuleType("transformers")
    fake_tf.AutoModel = types.SimpleNamespace(
        from_pretrained=lambda where, **kw: seen.setdefault("hf", (where, kw)) and FakeHFModel()
    )
    monkeypatch.setitem(sys.modules, "timm", FakeTimm("timm"))
    monkeypatch.setitem(sys.modules, "transformers", fake_tf)
    enc = load_encoder("vit_small_patch14_dinov2.lvd142m", image_size=224, device="cpu")
    assert seen["timm"] == ("vit_small_patch14_dinov2.lvd142m", True, {"num_classes": 0, "img_size": 224})
    assert enc.source == "timm" and enc.patch_size == 14
    (tmp_path / "timm.safetensors").write_bytes(b"x")
    load_encoder("vit_small_patch14_dinov2.lvd142m", source="timm", weights=tmp_path / "timm.safetensors")
    assert seen["timm"][2]["pretrained_cfg_overlay"] == {"file": str(tmp_path / "timm.safetensors")}
    (tmp_path / "hfdir").mkdir()
    enc = load_encoder("facebook/dinov2-small", weights=tmp_path / "hfdir", device="cpu")
    assert seen["hf"] == (str(tmp_path / "hfdir"), {"local_files_only": True})
    x = torch.randn(2, 3, 14, 14)
    torch.testing.assert_close(enc(x), torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1))
