"""Numbers with a spread, in more feature spaces (issue 17): repeats over sampling seeds,
FD-infinity and the bootstrap interval, CMMD, density/coverage, and the DINOv2 and CLIP
extractors loaded through their real loading code from locally saved random weights."""

from __future__ import annotations

import math

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from scipy import linalg
from torch_fidelity.metric_fid import fid_features_to_statistics

from genlab.evaluation import evaluate_model, spread
from genlab.metrics import Evaluator, WeightsNotFoundError
from genlab.metrics import dinov2 as dinov2_module
from genlab.metrics.extractors import build_extractor
from genlab.metrics.features import extract_features
from genlab.metrics.fidelity import TensorReference, fidelity_metrics
from genlab.metrics.frechet import bootstrap_fd, fd_infinity, frechet
from genlab.metrics.kernels import cmmd, density_coverage, mmd2_unbiased

from .test_clip_score import tiny_dir  # noqa: F401 -- a fixture: a tiny random open_clip folder
from .test_ddp_evaluation import _build

SMALL_DINO = "vit_small_patch14_dinov2.lvd142m"  # ViT-S/14: the B/14 code path at 1/4 the cost


# ------------------------------------------------------------------ FD-infinity, bootstrap
def gaussian_case(dim: int = 32, seed: int = 0):
    """Reference statistics of N(m, S) given exactly, and the true FD of N(0, I) to it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    sigma = a @ a.T + 0.5 * torch.eye(dim, dtype=torch.float64)
    mu = torch.full((dim,), 0.1, dtype=torch.float64)
    true = float(mu @ mu + dim + sigma.trace() - 2 * np.trace(linalg.sqrtm(sigma.numpy())).real)
    return {"mu": mu.numpy(), "sigma": sigma.numpy()}, true, g


def test_fd_infinity_removes_the_sample_size_bias_of_gaussian_features():
    """N(0, I) against N(m, S) in 32 dimensions, true FD 6.56. FD of 500 samples is biased up
    by ~0.7 (the 1/N terms: tr(I)/N from the mean alone is 0.064, the rest from the square
    root of the covariance product); FD-infinity from counts 500..2000 lands within 0.25 of the
    truth in every one of 5 draws. The tolerance: across draws FD-infinity scatters with a
    standard deviation of ~0.06 here, so 0.25 is 4 of those and still well below the bias."""
    ref, true, g = gaussian_case()
    for trial in range(5):
        gen = torch.randn(2000, 32, generator=g, dtype=torch.float64)
        plain_500 = frechet(gen[:500], ref)
        inf = fd_infinity(gen, ref, seed=trial)
        assert inf["counts"] == [500, 875, 1250, 1625, 2000]
        assert inf["fd"][-1] == pytest.approx(frechet(gen, ref))  # the plain value at n
        assert plain_500 - true > 0.4  # clearly biased high
        assert abs(inf["value"] - true) < 0.25
        assert inf["slope"] > 0  # FD falls as N grows


def test_bootstrap_interval_brackets_resampled_fds_and_is_seeded():
    ref, _, g = gaussian_case(dim=8)
    gen = torch.randn(400, 8, generator=g, dtype=torch.float64)
    a, b = bootstrap_fd(gen, ref, rounds=40, seed=1), bootstrap_fd(gen, ref, rounds=40, seed=1)
    assert a == b and a["low"] < a["high"] and a["std"] > 0
    assert bootstrap_fd(gen, ref, rounds=40, seed=2) != a
    with pytest.raises(ValueError, match="at least 2 rounds"):
        bootstrap_fd(gen, ref, rounds=1)


# ------------------------------------------------------------------ CMMD, density/coverage
def direct_mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """The unbiased MMD^2 by its definition, pair by pair, in float64."""
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_cmmd_equals_the_direct_unbiased_mmd_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    x, y = unit(torch.randn(20, 6, generator=g)), unit(torch.randn(15, 6, generator=g) + 0.5)
    x64, y64 = unit(x.double()).numpy(), unit(y.double()).numpy()  # CMMD normalises in float64
    direct = direct_mmd2(x64, y64, 10.0)
    assert cmmd(x, y) == pytest.approx(1000 * direct, rel=1e-9, abs=1e-12)
    assert mmd2_unbiased(x, y, 0.7) == pytest.approx(
        direct_mmd2(x.double().numpy(), y.double().numpy(), 0.7), rel=1e-9
    )
    # two samples of one distribution: ~0 (unbiased, either sign); shifted: clearly positive
    a, b = unit(torch.randn(800, 16, generator=g)), unit(torch.randn(800, 16, generator=g))
    shifted = unit(torch.randn(800, 16, generator=g) + 0.3)
    same, apart = cmmd(a, b), cmmd(a, shifted)
    assert abs(same) < 0.05 * apart and apart > 0


def direct_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020 Eqs. 3-4, point by point."""
    dist = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))
    radii = []
    for i in range(len(real)):
        others = sorted(dist(real[i], real[j]) for j in range(len(real)) if j != i)
        radii.append(others[k - 1])
    inside = [[dist(f, r) < radii[i] for f in fake] for i, r in enumerate(real)]
    density = sum(map(sum, inside)) / (k * len(fake))
    coverage = sum(any(row) for row in inside) / len(real)
    return density, coverage


def test_density_and_coverage_equal_the_direct_definitions():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(40, 5, generator=g, dtype=torch.float64)
    for fake in (torch.randn(30, 5, generator=g, dtype=torch.float64),
                 0.3 * torch.randn(30, 5, generator=g, dtype=torch.float64)):  # fmt: skip
        got = density_coverage(real, fake, k=3)
        density, coverage = direct_density_coverage(real.numpy(), fake.numpy(), 3)
        assert got["density"] == pytest.approx(density) and got["coverage"] == pytest.approx(
            coverage
        )
    # a collapsed generator: dense around one real point, covering almost nothing
    collapsed = real[:1].repeat(30, 1)
    assert density_coverage(real, collapsed, k=3)["coverage"] <= 4 / 40


def test_fidelity_metrics_names_every_space_apart():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 8, generator=g)
    stats = fid_features_to_statistics(feats)
    ref = {"features": {"256": feats}, **{k: torch.from_numpy(v) for k, v in stats.items()}}
    gen = {"256": torch.randn(200, 8, generator=g) + 0.2}
    how: dict = {}
    out = fidelity_metrics(
        "faces", {"fid": "256", "kid": "256", "prc": "256"}, gen, ref,
        metrics=["fid", "kid", "is", "pr", "dc"], kid_subsets=5, kid_subset_size=50,
        isc_splits=2, prc_neighborhood=3, fd_infinity={"points": 4, "min_fraction": 0.5},
        bootstrap=5, dc_neighborhood=4, protocol=how,
    )  # fmt: skip
    assert set(out) == {
        "fd_faces", "fd_faces_inf", "fd_faces_ci_low", "fd_faces_ci_high", "kid_faces_mean",
        "kid_faces_std", "precision_faces", "recall_faces", "density_faces", "coverage_faces",
    }  # fmt: skip
    assert how["fd_infinity"]["counts"] == [100, 133, 167, 200]
    assert how["density_coverage"]["neighbours"] == 4 and how["bootstrap"]["rounds"] == 5
    # as many real features as generated (a fixed subset), as Naeem et al. compare them
    assert how["density_coverage"]["real"].startswith("200 of 300")


# ------------------------------------------------------------------ repeats
def test_repeats_draw_k_sample_sets_and_report_their_spread(tmp_path):
    model, datamodule = _build(tmp_path)
    common = dict(metrics=["fid", "kid", "cost"], extractors=["digits"],
                  digit_datasets=["synthetic"], num_samples=12, sample_batch_size=6,
                  reference_samples=32, kid_subset_size=6, kid_subsets=4,
                  progress=False)  # fmt: skip
    ev = Evaluator(**common, repeats=3, seed=5)
    metrics, protocol = evaluate_model(ev, model, datamodule)
    values = protocol["repeats"]["values"]["fd_digits"]
    assert protocol["repeats"]["seeds"] == [5, 6, 7] and len(set(values)) == 3
    # each set is the one a single evaluation with that seed gives
    for seed, value in zip([5, 6, 7], values, strict=True):
        single, _ = evaluate_model(Evaluator(**common, seed=seed), model, datamodule)
        assert single["val/fd_digits"] == pytest.approx(value, rel=1e-6)
    assert metrics["val/fd_digits"] == pytest.approx(np.mean(values))
    assert metrics["val/fd_digits_std"] == pytest.approx(np.std(values, ddof=1))
    # KID's within-set std (over subsets) is averaged; its mean gets the spread over sets
    kid = protocol["repeats"]["values"]
    assert metrics["val/kid_digits_std"] == pytest.approx(np.mean(kid["kid_digits_std"]))
    assert metrics["val/kid_digits_mean_std"] == pytest.approx(
        np.std(kid["kid_digits_mean"], ddof=1)
    )
    assert "val/sample_img_per_s_std" in metrics
    assert not any(k.endswith("_std_std") for k in metrics)  # a spread has no spread
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Evaluator(repeats=0)


def test_spread_renames_a_within_set_std_whose_name_the_spread_takes():
    sets = [{"is_digits": 2.0, "is_digits_std": 0.1}, {"is_digits": 4.0, "is_digits_std": 0.3}]
    out, values = spread(sets)
    assert out["is_digits"] == 3.0 and out["is_digits_std"] == pytest.approx(math.sqrt(2))
    assert out["is_digits_within_std"] == pytest.approx(0.2)
    assert values == {"is_digits": [2.0, 4.0], "is_digits_std": [0.1, 0.3]}


# ------------------------------------------------------------------ DINOv2 and CLIP spaces
@pytest.fixture(scope="module")
def random_dino(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2-small-random.pth"
    return dinov2_module.save_random_dinov2(path, SMALL_DINO)


def u8_images(n: int, seed: int, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


def test_dinov2_loads_a_saved_file_through_timm_with_distinct_features(random_dino):
    ext = build_extractor("dinov2", random_dino, options={"model": SMALL_DINO})
    assert ext.key == "dinov2" and ext.layers == {"fid": "cls", "kid": "cls", "prc": "cls"}
    feats = extract_features(ext, u8_images(6, 0), batch_size=3)["cls"]
    assert feats.shape == (6, 384) and torch.isfinite(feats).all()
    # not degenerate: images differ in feature space (timm's init would give ~1e-5 here)
    assert (feats[0] - feats[1]).abs().mean() > 0.05
    again = extract_features(ext, u8_images(6, 0), batch_size=6)["cls"]
    assert torch.allclose(feats, again, atol=1e-5)
    # the same weights file, checked by the protocol
    assert ext.protocol()["weights"] == str(random_dino)


def test_dinov2_weights_at_the_published_resolution_load_at_224(tmp_path):
    """The published DINOv2 weights are for 518x518 (37x37 patches); timm's filter resizes the
    position embeddings to the 16x16 patches of 224x224 as they load."""
    import timm

    torch.manual_seed(0)
    published = timm.create_model(SMALL_DINO, pretrained=False, num_classes=0)
    assert published.pos_embed.shape[1] == 1 + 37 * 37
    torch.save(published.state_dict(), tmp_path / "dinov2-518.pth")
    net = dinov2_module.load_dinov2(SMALL_DINO, tmp_path / "dinov2-518.pth")
    assert net.pos_embed.shape[1] == 1 + 16 * 16
    assert torch.equal(net.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)


def test_dinov2_offline_without_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(dinov2_module, "reachable", lambda *a, **k: False)
    with pytest.raises(WeightsNotFoundError) as err:
        build_extractor("dinov2")
    message = str(err.value)
    assert "\n" not in message and "timm/vit_base_patch14_dinov2.lvd142m" in message
    assert "metrics.dinov2.weights=<path" in message
    with pytest.raises(WeightsNotFoundError, match="not found at"):
        build_extractor("dinov2", tmp_path / "missing.pth")
    # an unusable file: one line naming it
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as err:
        build_extractor("dinov2", bad, options={"model": SMALL_DINO})
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_cmmd_on_the_bundled_digit_clip_offline():
    """clip_digits loads offline and gives cmmd_digits: ~0 for the same bars mirrored, far
    above for noise."""
    digits = torch.zeros(40, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 8:20, 12:16] = 255  # bars
    blobs = u8_images(40, 1)[:, :1]
    ref = TensorReference(digits, name="bars")
    ev = Evaluator(metrics=["cmmd"], extractors=["clip_digits"], digit_datasets=["bars"],
                   num_samples=40, sample_batch_size=20, reference_samples=None,
                   progress=False)  # fmt: skip
    same = ev.evaluate_images(digits.flip(-1), ref)["metrics"]["val/cmmd_digits"]
    apart = ev.evaluate_images(blobs, ref)
    assert apart["metrics"]["val/cmmd_digits"] > 10 * abs(same)
    assert apart["protocol"]["extractors"]["clip_digits"]["cmmd"]["sigma"] == 10.0


def test_cmmd_clip_loads_a_local_open_clip_and_refuses_offline_in_one_line(tiny_dir, monkeypatch):  # noqa: F811
    """The ``clip`` extractor goes through ``load_clip``: a user's local open_clip folder loads
    (a tiny random model here) and gives ``cmmd``; ViT-L-14-336/openai offline is one line."""
    ext = build_extractor("clip", options={"model": f"local-dir:{tiny_dir}"})
    assert ext.layers == {"cmmd": "embedding"} and ext.weights_sha256
    feats = extract_features(ext, u8_images(5, 2, size=32))["embedding"]
    assert feats.shape == (5, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)
    local = {"model": f"local-dir:{tiny_dir}", "pretrained": None}
    ev = Evaluator(metrics=["fid", "cmmd"], extractors=["clip"], num_samples=20,
                   sample_batch_size=10, reference_samples=None, cmmd_clip=local,
                   progress=False)  # fmt: skip
    ref = TensorReference(u8_images(20, 3, size=32), name="noise")
    out = ev.evaluate_images(u8_images(20, 4, size=32), ref)["metrics"]
    assert set(out) == {"val/cmmd"}  # no Frechet distance in a CLIP space
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as err:
        build_extractor("clip")
    assert "\n" not in str(err.value) and "ViT-L-14-336" in str(err.value)
