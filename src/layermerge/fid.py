"""Frechet distance between Gaussian fits of image features (FID, Heusel et al. 2017).

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)``

The trace term is computed in float64 from two symmetric eigendecompositions
(``S_1^1/2`` from the eigenvectors of ``S_1``, then the eigenvalues of the symmetric
PSD matrix ``S_1^1/2 S_2 S_1^1/2``, negative rounding clipped to 0), so it stays
real and finite for singular covariances (fewer samples than feature dimensions)
where a general ``sqrtm`` of the non-symmetric ``S_1 S_2`` goes complex;
eigenvalues within rounding of zero count as zero.

Feature spaces, and every number says which one it is in (:attr:`FIDResult.label`):

- **Inception** (:func:`inception_features`): the standard FID network, only from a
  library the user has installed *with its weights already on disk*:
  ``torch-fidelity`` (``weights-inception-2015-12-05-6726825d.pth``) or
  ``pytorch-fid`` (``pt_inception-2015-12-05-6726825d.pth``), in
  ``$TORCH_HOME/hub/checkpoints`` or given as a path. Nothing is downloaded.
- **classifier** (:func:`classifier_features`): the penultimate-layer features
  (the input of the last ``nn.Linear``) of a classifier trained on the same data,
  e.g. ``layermerge:resnet20`` trained by ``layermerge train`` on Fashion-MNIST at
  32x32. Such numbers rank models on one dataset; they are not comparable with
  Inception FIDs from papers.

KID (:func:`kid`, Binkowski et al. 2018): the unbiased estimate of MMD^2 between
two feature sets with the kernel ``k(a, b) = (a . b / d + 1)^3``; about 0 (possibly
negative) for two samples of one distribution at any sample count, where FID is
biased upwards at small n. :func:`quality_of_images` gives both, each with a
bootstrap SD and 95 % interval over the generated images
(:class:`QualityResult`), against :func:`reference_features` (every reference
vector kept, cached as ``.npz``: features, mu, sigma, n, plus a JSON sidecar with a
schema version).

Reference statistics are cached as ``.npz`` (``mu``, ``sigma``, ``n``; read with
``allow_pickle=False``) plus a ``.json`` sidecar naming the feature space and what
the statistics were computed from; a cache made with other settings is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fileio import file_digest

STATS_SCHEMA = 1
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


class FeaturesUnavailableError(RuntimeError):
    """The requested feature extractor cannot be built here (library or weights missing)."""


# ---------------------------------------------------------------------------
# the distance


def gaussian_fit(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``N - 1``) covariance of ``features`` (N, D), in float64."""
    f = np.asarray(
        features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features,
        dtype=np.float64,
    )
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    # Eigenvalues within rounding of zero (|w| <= D eps max|w|, as a pseudo-inverse's
    # cut-off) are zero: their square roots (~1e-8 max|w|^1/2 each) would otherwise add
    # up over the null space of a singular covariance.
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S_1 S_2)^1/2)`` for symmetric PSD ``S_1``, ``S_2``: the eigenvalues of
    ``S_1 S_2`` are those of the PSD ``S_1^1/2 S_2 S_1^1/2``."""
    a = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    m = a @ np.asarray(sigma2, dtype=np.float64) @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_eigenvalues(w)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: means {mu1.shape}, {mu2.shape}, covariances "
            f"{s1.shape}, {s2.shape}"
        )
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    # exact arithmetic gives d >= 0; rounding can leave a tiny negative
    return max(float(d), 0.0)


# ---------------------------------------------------------------------------
# statistics


@dataclass
class FeatureStats:
    """A Gaussian fit of ``n`` feature vectors, with the feature space it lives in."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    label: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, features, label: str, meta: dict[str, Any] | None = None) -> FeatureStats:
        mu, sigma = gaussian_fit(features)
        return cls(mu, sigma, int(len(features)), label, dict(meta or {}))

    def save(self, path: str | Path) -> Path:
        """``path`` (.npz: mu, sigma, n) and ``path`` with ``.json`` (label, meta)."""
        sidecar = {"schema": STATS_SCHEMA, "label": self.label, "n": self.n, "meta": self.meta}
        return _write_npz(path, sidecar, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        side = _read_sidecar(path, STATS_SCHEMA, "feature-statistics")
        with np.load(path, allow_pickle=False) as z:
            mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
        return cls(mu, sigma, n, side["label"], side.get("meta", {}))


def _json_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_npz(path: str | Path, sidecar: dict[str, Any], **arrays: np.ndarray) -> Path:
    """``arrays`` as ``path`` (.npz, written to a temporary file and moved into place)
    and ``sidecar`` as ``path.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    _json_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def _read_sidecar(path: Path, schema: Any, what: str) -> dict[str, Any]:
    side = json.loads(_json_path(path).read_text())
    if side.get("schema") != schema:
        raise ValueError(f"{path}: not a layermerge {what} file")
    return side


@dataclass
class FIDResult:
    """A Frechet distance and the feature space it was measured in."""

    fid: float
    label: str
    n: int  # feature vectors of the first set (e.g. samples)
    n_ref: int  # of the reference set

    def __str__(self) -> str:
        return f"{self.label}: {self.fid:.4f} ({self.n} vs {self.n_ref} images)"

    def to_dict(self) -> dict[str, Any]:
        return {"fid": self.fid, "feature_space": self.label, "n": self.n, "n_ref": self.n_ref}


def fid_between(a: FeatureStats, b: FeatureStats) -> FIDResult:
    """FID of two fits; refused unless both are in the same feature space."""
    fa, fb = (json.dumps(s.meta.get("features"), sort_keys=True) for s in (a, b))
    if a.label != b.label or fa != fb:
        raise ValueError(
            f"the statistics are in different feature spaces ({a.label!r} vs {b.label!r})"
        )
    return FIDResult(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), a.label, a.n, b.n)


# ---------------------------------------------------------------------------
# feature extractors


class FeatureExtractor:
    """Images in [-1, 1] ``(N, C, H, W)`` -> features ``(N, D)`` (float64 numpy).

    ``label`` is the human-readable name of the feature space (it prefixes every
    number), ``identity`` what the features depend on (checked against caches).
    """

    label: str = "features"
    identity: dict[str, Any]

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], label: str, identity: dict):
        self._fn, self.label, self.identity = fn, label, identity

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self._fn(images).detach().double().cpu().numpy()

    def features(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        return np.concatenate([self(b) for b in batches])

    def stats(self, batches: Iterable[torch.Tensor], meta: dict | None = None) -> FeatureStats:
        return FeatureStats.of(
            self.features(batches), self.label, {"features": self.identity, **(meta or {})}
        )


def _penultimate(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear: cannot take penultimate-layer features"
        )
    return last


def _model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def classifier_features(
    model: nn.Module,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    name: str,
    data: str,
    weights_digest: str | None = None,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """Penultimate-layer features of ``model`` (the input of its last ``nn.Linear``).

    Images in [-1, 1] are mapped to [0, 1] and normalised by ``mean``/``std`` (the
    statistics the classifier was trained with). ``name`` and ``data`` name the
    classifier and its training data in the label.
    """
    model = model.to(device).eval()
    head = _penultimate(model)
    grabbed: list[torch.Tensor] = []
    head.register_forward_hook(lambda _m, inp, _out: grabbed.append(inp[0].flatten(1)))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = (images.float().cpu().clamp(-1, 1) + 1.0) / 2.0
        grabbed.clear()
        model(((x - m) / s).to(device))
        return grabbed[-1]

    label = f"FID (classifier features: {name} trained on {data}), not comparable to Inception FID"
    identity = {
        "kind": "classifier",
        "classifier": name,
        "data": data,
        "weights_digest": weights_digest or _model_digest(model),
        "mean": list(mean),
        "std": list(std),
    }
    return FeatureExtractor(fn, label, identity)


def load_classifier_features(
    spec: str,
    weights: str | Path,
    data: str = "fashion-mnist",
    *,
    model_kwargs: dict | str | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """:func:`classifier_features` of ``spec`` (a model string) with trained ``weights``
    on the dataset ``data`` (its mean/std normalise the images)."""
    from .data import open_dataset
    from .models import load_model

    loaded = load_model(spec, model_kwargs, weights, input_shape)
    ds = open_dataset(data)
    return classifier_features(
        loaded.model,
        mean=tuple(ds.mean),
        std=tuple(ds.std),
        name=spec,
        data=ds.spec.kind,
        weights_digest=file_digest(weights),
        device=device,
    )


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception_features(
    weights: str | Path | None = None, *, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """Inception-v3 pool features (2048-d) of the standard FID network, from
    ``torch-fidelity`` or ``pytorch-fid`` when installed with their weights on disk.

    ``weights``: the weights file (torch-fidelity's format); without it the library's
    usual file in ``$TORCH_HOME/hub/checkpoints`` is used if it is there. Raises
    :class:`FeaturesUnavailableError` saying what to provide otherwise.
    """
    label = "FID (Inception-v3 pool3 features)"
    tried = []
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        tried.append("torch-fidelity is not installed")
    else:
        path = Path(weights) if weights is not None else _hub_checkpoint(TORCH_FIDELITY_WEIGHTS)
        if path.is_file():
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            ).to(device)

            def fn(images: torch.Tensor) -> torch.Tensor:
                # torch-fidelity takes uint8 RGB and resizes to 299 itself
                return net(_to_rgb_uint8(images).to(device))[0]

            identity = {"kind": "inception", "library": "torch-fidelity"}
            identity["weights_digest"] = file_digest(path)
            return FeatureExtractor(fn, label, identity)
        tried.append(f"torch-fidelity is installed but its weights are not at {path}")
    if weights is None:
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError:
            tried.append("pytorch-fid is not installed")
        else:
            path = _hub_checkpoint(PYTORCH_FID_WEIGHTS)
            if path.is_file():
                # finds the file in the hub cache, so nothing is downloaded
                net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

                def fn(images: torch.Tensor) -> torch.Tensor:
                    x = _to_rgb_uint8(images).float().div(255.0).to(device)
                    return net(x)[0].flatten(1)

                identity = {"kind": "inception", "library": "pytorch-fid"}
                identity["weights_digest"] = file_digest(path)
                return FeatureExtractor(fn, label, identity)
            tried.append(f"pytorch-fid is installed but its weights are not at {path}")
    raise FeaturesUnavailableError(
        "Inception features are not available here ("
        + "; ".join(tried)
        + "). Nothing is downloaded: install torch-fidelity or pytorch-fid and copy the "
        f"Inception weights file ({TORCH_FIDELITY_WEIGHTS} or {PYTORCH_FID_WEIGHTS}) into "
        f"{_hub_checkpoint('')} (or pass the torch-fidelity weights path), or use "
        "classifier features (--features classifier) instead"
    )


# ---------------------------------------------------------------------------
# reference statistics and FID of samples


def split_images(split, batch_size: int = 500, limit: int | None = None):
    """The images of a data split, in order (labels dropped), at most ``limit``."""
    seen = 0
    for x, _ in split.batches(batch_size, train=False):
        if limit is not None and seen + len(x) > limit:
            x = x[: limit - seen]
        seen += len(x)
        if len(x):
            yield x
        if limit is not None and seen >= limit:
            return


def _reference_meta(extractor: FeatureExtractor, split, limit, source) -> dict[str, Any]:
    """What a reference cache was made from (features and images), as read back from
    its JSON sidecar (tuples become lists)."""
    meta = {
        "features": extractor.identity,
        "source": {
            **(source or {}),
            "split": split.name,
            "images": len(split) if limit is None else min(limit, len(split)),
        },
    }
    return json.loads(json.dumps(meta))


def _cached(cls, cache: str | Path | None, meta: dict[str, Any], label: str):
    """``cls.load(cache)`` when the cache exists and was made from ``meta`` in the
    feature space ``label``; else ``None`` (a missing, unreadable or other cache)."""
    if cache is None or not Path(cache).is_file() or not _json_path(Path(cache)).is_file():
        return None
    try:
        obj = cls.load(cache)
    except (ValueError, KeyError, OSError):
        return None
    return obj if obj.meta == meta and obj.label == label else None


def reference_stats(
    extractor: FeatureExtractor,
    split,
    *,
    cache: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    source: dict[str, Any] | None = None,
) -> FeatureStats:
    """Statistics of a data split's images (in [-1, 1], e.g. from
    :meth:`layermerge.diffusion.DiffusionTask.make_data`), read from ``cache`` when it
    was made with the same features and images, else computed (and saved there).

    ``source`` describes the images (data spec, split, transform) for the cache check.
    """
    meta = _reference_meta(extractor, split, limit, source)
    stats = _cached(FeatureStats, cache, meta, extractor.label)
    if stats is not None:
        return stats
    stats = FeatureStats.of(
        extractor.features(split_images(split, batch_size, limit)), extractor.label, meta
    )
    if cache is not None:
        stats.save(cache)
    return stats


def fid_of_images(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    reference: FeatureStats,
    *,
    batch_size: int = 500,
) -> FIDResult:
    """FID of ``images`` (in [-1, 1]) against ``reference`` statistics made by the
    same ``extractor``."""
    if isinstance(images, torch.Tensor):
        images = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    stats = extractor.stats(images)
    return fid_between(stats, reference)


# ---------------------------------------------------------------------------
# KID, reference features, quality with spreads

#: the JSON sidecar's schema of a reference-features cache (npz: features, mu, sigma, n)
FEATURES_SCHEMA = "layermerge-reference-features/1"


def _as_float64(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"need features of shape (N, D), got {f.shape}")
    return f


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x . y / d + 1)^3`` between the rows of ``x`` and ``y``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _offdiag_mean(k: np.ndarray) -> float:
    m = k.shape[0]
    return float((k.sum() - np.trace(k)) / (m * (m - 1)))


def _kernel_offdiag_mean(y: np.ndarray, block: int = 2000) -> float:
    """``mean_{i != j} k(y_i, y_j)`` in row blocks (a 10,000-image reference would
    need a 0.8 GB kernel matrix at once)."""
    n, total = len(y), 0.0
    for i in range(0, n, block):
        kb = polynomial_kernel(y[i : i + block], y)
        total += kb.sum() - np.trace(kb[:, i : i + block])
    return float(total / (n * (n - 1)))


def kid(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int | None = 1000,
    seed: int = 0,
) -> float:
    """Kernel inception distance (Binkowski et al. 2018) of feature sets ``x`` and ``y``:
    the unbiased estimate of MMD^2 with the cubic polynomial kernel
    ``k(a, b) = (a . b / d + 1)^3``,

    ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)``.

    Averaged over ``subsets`` pairs of random subsets (without replacement) of
    ``m = min(subset_size, len(x), len(y))`` rows each, drawn with ``seed``, as in the
    reference implementation; ``subset_size=None``: one estimate over all of ``x`` and
    ``y`` (the same expectation, lower variance). Unbiased at any sample count: it
    is about 0 (and can be negative) for two samples of one distribution.
    """
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    if subset_size is None:
        return (
            _kernel_offdiag_mean(x)
            + _kernel_offdiag_mean(y)
            - 2.0 * float(polynomial_kernel(x, y).mean())
        )
    m = min(int(subset_size), len(x), len(y))
    if m < 2 or subsets < 1:
        raise ValueError(f"need subset_size >= 2 and subsets >= 1 (got {m}, {subsets})")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        vals.append(
            _offdiag_mean(polynomial_kernel(a, a))
            + _offdiag_mean(polynomial_kernel(b, b))
            - 2.0 * float(polynomial_kernel(a, b).mean())
        )
    return float(np.mean(vals))


@dataclass
class ReferenceFeatures:
    """The feature vectors of a reference set (e.g. the test split), kept whole for
    KID, with their Gaussian fit for FID (:attr:`stats`)."""

    features: np.ndarray
    label: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = _as_float64(self.features)
        self._stats: FeatureStats | None = None
        self._kyy: float | None = None

    @property
    def n(self) -> int:
        return int(len(self.features))

    @property
    def stats(self) -> FeatureStats:
        """The Gaussian fit (a :class:`FeatureStats` in the same feature space)."""
        if self._stats is None:
            self._stats = FeatureStats.of(self.features, self.label, self.meta)
        return self._stats

    def kernel_mean(self) -> float:
        """``mean_{i != j} k(y_i, y_j)`` over the reference (KID's constant term)."""
        if self._kyy is None:
            self._kyy = _kernel_offdiag_mean(self.features)
        return self._kyy

    def save(self, path: str | Path) -> Path:
        """``path`` (.npz: features, mu, sigma, n; no pickles) and ``path.json``
        (schema, label, n, dim, meta)."""
        st = self.stats
        side = {
            "schema": FEATURES_SCHEMA,
            "label": self.label,
            "n": self.n,
            "dim": int(self.features.shape[1]),
            "meta": self.meta,
        }
        return _write_npz(
            path, side, features=self.features, mu=st.mu, sigma=st.sigma, n=np.int64(self.n)
        )

    @classmethod
    def load(cls, path: str | Path) -> ReferenceFeatures:
        path = Path(path)
        side = _read_sidecar(path, FEATURES_SCHEMA, "reference-features")
        with np.load(path, allow_pickle=False) as z:
            feats = z["features"]
        if feats.shape != (side["n"], side["dim"]):
            raise ValueError(
                f"{path}: features of shape {feats.shape}, the sidecar says "
                f"({side['n']}, {side['dim']})"
            )
        return cls(feats, side["label"], side.get("meta", {}))


def features_of_images(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 500,
) -> np.ndarray:
    """Features ``(N, D)`` (float64) of ``images`` in [-1, 1] (a tensor or batches)."""
    if isinstance(images, torch.Tensor):
        images = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return extractor.features(images)


def reference_features(
    extractor: FeatureExtractor,
    split,
    *,
    cache: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    source: dict[str, Any] | None = None,
) -> ReferenceFeatures:
    """The features of a data split's images, as :func:`reference_stats` but keeping
    every vector (for KID); read from ``cache`` when it was made with the same
    features and images (the same check as :func:`reference_stats`), else computed and
    saved there. ``.stats`` is what :func:`reference_stats` returns for the same split."""
    meta = _reference_meta(extractor, split, limit, source)
    ref = _cached(ReferenceFeatures, cache, meta, extractor.label)
    if ref is not None:
        return ref
    ref = ReferenceFeatures(
        extractor.features(split_images(split, batch_size, limit)), extractor.label, meta
    )
    if cache is not None:
        ref.save(cache)
    return ref


@dataclass
class QualityResult:
    """FID and KID of one set of images against a reference, each with the spread of
    the generated side: bootstrap standard deviations and normal 95 % intervals
    (value +- 1.96 SD) over ``draws`` resamples (with replacement) of the images."""

    fid: float
    fid_sd: float
    fid_ci: tuple[float, float]
    kid: float
    kid_sd: float
    kid_ci: tuple[float, float]
    n: int
    n_ref: int
    label: str
    draws: int

    def __str__(self) -> str:
        return (
            f"{self.label}: FID {self.fid:.3f} +- {self.fid_sd:.3f}, KID x1e3 "
            f"{self.kid * 1e3:.3f} +- {self.kid_sd * 1e3:.3f} ({self.n} vs {self.n_ref} images, "
            f"bootstrap SDs over {self.draws} resamples)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fid": self.fid,
            "fid_sd": self.fid_sd,
            "fid_ci95": list(self.fid_ci),
            "kid": self.kid,
            "kid_sd": self.kid_sd,
            "kid_ci95": list(self.kid_ci),
            "n": self.n,
            "n_ref": self.n_ref,
            "feature_space": self.label,
            "spread": f"bootstrap over the {self.n} generated images, {self.draws} resamples",
        }


def quality_of_features(
    features: np.ndarray | torch.Tensor,
    reference: ReferenceFeatures,
    *,
    draws: int = 200,
    seed: int = 0,
) -> QualityResult:
    """FID (Gaussian fits) and KID (one unbiased estimate over all ``features`` and all
    reference vectors) of ``features`` against ``reference``, with bootstrap spreads:
    ``draws`` resamples of ``features`` with replacement (the reference is fixed; with
    thousands of reference images its share of the variance is small). In a
    resample, KID's within-set term skips pairs of copies of one image (they would
    be ``k(x, x)`` terms, which bias it upwards); FID's resamples, whose duplicates
    shrink the covariance, give the SD only: the interval is ``fid +- 1.96 SD``
    around the full-sample value, likewise for KID. ``draws=0``: no spreads (NaN)."""
    x = _as_float64(features)
    ref = reference.stats
    if x.shape[1] != reference.features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {x.shape[1]} vs {reference.features.shape[1]}"
        )
    n = len(x)
    kxx = polynomial_kernel(x, x)
    kxy = polynomial_kernel(x, reference.features).mean(1)  # per generated image
    kyy = reference.kernel_mean()
    kid_value = _offdiag_mean(kxx) + kyy - 2.0 * float(kxy.mean())
    fid_value = frechet_distance(*gaussian_fit(x), ref.mu, ref.sigma)
    fids, kids = [], []
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        mask = idx[:, None] != idx[None, :]
        if mask.any():  # a resample of one image repeated has no within-set pair
            kids.append(
                float(kxx[np.ix_(idx, idx)][mask].mean()) + kyy - 2.0 * float(kxy[idx].mean())
            )
        fids.append(frechet_distance(*gaussian_fit(x[idx]), ref.mu, ref.sigma))
    fid_sd = float(np.std(fids, ddof=1)) if draws > 1 else float("nan")
    kid_sd = float(np.std(kids, ddof=1)) if len(kids) > 1 else float("nan")
    return QualityResult(
        fid=float(fid_value),
        fid_sd=fid_sd,
        fid_ci=(fid_value - 1.96 * fid_sd, fid_value + 1.96 * fid_sd),
        kid=float(kid_value),
        kid_sd=kid_sd,
        kid_ci=(kid_value - 1.96 * kid_sd, kid_value + 1.96 * kid_sd),
        n=n,
        n_ref=reference.n,
        label=reference.label.replace("FID (", "FID/KID (", 1).replace(
            "Inception FID", "Inception FID/KID"
        ),
        draws=draws,
    )


def quality_of_images(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    reference: ReferenceFeatures,
    *,
    draws: int = 200,
    seed: int = 0,
    batch_size: int = 500,
) -> QualityResult:
    """:func:`quality_of_features` of ``images`` (in [-1, 1]) under ``extractor``,
    against ``reference`` features made by the same extractor (checked)."""
    if (
        json.dumps(reference.meta.get("features"), sort_keys=True)
        != json.dumps(json.loads(json.dumps(extractor.identity)), sort_keys=True)
        or reference.label != extractor.label
    ):
        raise ValueError("the reference features were made by another feature extractor")
    feats = features_of_images(images, extractor, batch_size=batch_size)
    return quality_of_features(feats, reference, draws=draws, seed=seed)


__all__ = [
    "FEATURES_SCHEMA",
    "FIDResult",
    "FeatureExtractor",
    "FeatureStats",
    "FeaturesUnavailableError",
    "classifier_features",
    "fid_between",
    "features_of_images",
    "fid_of_images",
    "frechet_distance",
    "gaussian_fit",
    "inception_features",
    "kid",
    "load_classifier_features",
    "polynomial_kernel",
    "quality_of_features",
    "quality_of_images",
    "QualityResult",
    "reference_features",
    "ReferenceFeatures",
    "reference_stats",
    "split_images",
    "trace_sqrt_product",
]
