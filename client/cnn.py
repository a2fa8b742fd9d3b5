"""The site's half of the federated 3D CNN (phase 5): crops, local training and evaluation.

Pure torch and MONAI, independent of Flower: ``client/app.py`` unpacks the global weights, calls
:func:`train_round` or :func:`evaluate_arrays` and packs the reply (new weights and the number of
training crops, or metrics). Crops, labels and per-patient predictions never leave this module's
results: a reply carries weights, counts and metrics over at least
:data:`client.study.MIN_ROWS_SENT` patients.

The crop (what the network sees)
    One channel, array layout ``(z, y, x)`` (SimpleITK's array order) of shape
    ``crop_size[::-1]``: :attr:`CnnSpec.crop_size` is ``(x, y, z)`` in voxels, like the
    protocol's ``spacing_mm``. The crop is a box centred on the bounding box of the ROI
    (``ingestion.roi_label``) of the IBSI-standardized volume, padded by :data:`CROP_MARGIN_MM`
    on each side and resampled (linear) so that the box fills the crop: the same in-plane spacing
    along x and y (the ROI keeps its axial shape), its own spacing along z. Intensities are
    z-scored with the mean and SD of the (re-segmented) ROI voxels, clipped to
    +/- :data:`CLIP_SD`, and set to 0 (the ROI mean) farther than :data:`ROI_DILATION_MM` outside
    the ROI: the network sees the marrow, not the fat, muscle or air, whose scanner-dependent
    signal would otherwise dominate. Tensors are ``(batch, 1, z, y, x)``.

The regression target
    Labels are mapped from ``task.value_range = (low, high)`` to [-1, 1] (a :class:`TargetScale`
    derived from the protocol alone, the same at every site, no patient value sent); MSE on that
    scale. A protocol without a value range needs a :class:`TargetScale` passed in (e.g. pooled
    moments from the server).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import multiprocessing
import time
import zipfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from client.manifest import CaseSpec
from common.errors import CaseError, ConfigError, SkipReason
from common.protocol import CnnSpec, StudyProtocol, TaskKind
from common.site_config import SiteConfig

if TYPE_CHECKING:
    from monai.transforms import Compose

log = logging.getLogger("myelofed.site")

CROP_SCHEMA_VERSION = 1
CROP_FILE = "crops.npz"
#: Context kept around the ROI's bounding box, each side, mm.
CROP_MARGIN_MM = 4.0
#: Voxels farther than this outside the ROI are set to 0 (the ROI mean), mm.
ROI_DILATION_MM = 2.0
#: z-scored intensities are clipped to +/- this many ROI standard deviations.
CLIP_SD = 5.0


def _cnn_spec(protocol: StudyProtocol) -> CnnSpec:
    if protocol.cnn is None:
        raise ConfigError("study protocol", ["has no 'cnn' section: the CNN phase is not part "
                                             "of this study"])
    return protocol.cnn


# --- device and network -------------------------------------------------------------------------

def select_device(preference: str) -> torch.device:
    """The torch device of a site's ``device`` setting: ``"auto"`` (CUDA when available, else
    CPU), ``"cpu"`` or ``"cuda"`` (a :class:`ConfigError` when this machine has no CUDA)."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("site config", [
                "device = 'cuda', but torch finds no CUDA device here (no GPU, no driver, or "
                "a CPU-only torch build): set device = 'auto' or 'cpu'"])
        return torch.device("cuda")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ConfigError("site config", [f"device = '{preference}' is not auto, cpu or cuda"])


def build_network(spec: CnnSpec, task_kind: TaskKind, *, seed: int = 0) -> torch.nn.Module:
    """The MONAI 3D network of ``spec.architecture`` with one input channel and one output (a
    logit for classification, a scaled value for regression; ``task_kind`` does not change the
    network, only how :func:`train_round` reads its output). No pretrained weights.

    The initial weights are a function of ``seed`` alone (the global torch RNG is left as it
    was): the server and every site build the same model. A crop too small for the network's
    downsampling is a :class:`ConfigError`.
    """
    from monai.networks.nets import DenseNet121, resnet10, resnet18

    TaskKind(task_kind)  # refuse anything else early
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: torch.nn.Module
        if spec.architecture in ("resnet10", "resnet18"):
            # widen_factor scales every block's channels (1 = MONAI's 64-512: 14 M weights for
            # resnet10); a stride-2 first convolution halves the crop before the 7^3 kernels
            # run over it, as ImageNet ResNets do (MONAI's default is stride 1)
            make = resnet10 if spec.architecture == "resnet10" else resnet18
            model = make(spatial_dims=3, n_input_channels=1, num_classes=1,
                         widen_factor=spec.width, conv1_t_stride=2)
        else:
            model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    x, y, z = spec.crop_size
    model.eval()
    try:  # one empty crop through the network: its pooling must fit the crop
        with torch.no_grad():
            model(torch.zeros(1, 1, z, y, x))
    except RuntimeError as exc:
        raise ConfigError("study protocol", [
            f"cnn.crop_size = {list(spec.crop_size)} (x, y, z) is too small for "
            f"{spec.architecture}: {str(exc).splitlines()[0]}"]) from None
    model.train()
    return model


# --- weights as arrays ----------------------------------------------------------------------------

def state_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters and buffers (BatchNorm running statistics and batch counters) as
    CPU numpy arrays, in the model's ``state_dict`` order: what travels between server and
    sites, so that FedAvg averages the running statistics too."""
    return {name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()}


def load_state_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` (as from :func:`state_arrays`, possibly averaged) into ``model``.

    Every name must be present, with the model's shape, a numeric dtype and finite values;
    otherwise a :class:`~common.glm.ModelError` names the tensors at fault and the model is left
    unchanged. Values are cast to each tensor's dtype (averaged batch counters are rounded); a
    scalar buffer may come as one value of shape (1,) (Flower's median and trimmed mean). A
    BatchNorm running variance below 0, which the noise of local differential privacy leaves in
    the average, is clamped to 0 (post-processing: the privacy guarantee holds); unclamped,
    every output would be NaN.
    """
    from common.glm import ModelError

    state = model.state_dict()
    missing = [name for name in state if name not in arrays]
    unknown = [name for name in arrays if name not in state]
    if missing or unknown:
        raise ModelError(f"weights do not fit {type(model).__name__}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    loaded = {}
    for name, tensor in state.items():
        array = np.asarray(arrays[name])
        if tensor.dim() == 0 and array.shape == (1,):
            array = array.reshape(())  # a scalar buffer as some aggregators return it
        if array.shape != tuple(tensor.shape):
            raise ModelError(f"weight '{name}' has shape {array.shape}, the model's is "
                             f"{tuple(tensor.shape)}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
                or array.dtype == np.bool_):
            raise ModelError(f"weight '{name}' has dtype {array.dtype}, not a number")
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ModelError(f"weight '{name}' holds {bad} non-finite value(s) (NaN or inf)")
        if not tensor.is_floating_point():
            array = np.rint(array)
        elif name.endswith("running_var"):
            array = np.maximum(array, 0.0)
        loaded[name] = torch.as_tensor(array).to(dtype=tensor.dtype)
    model.load_state_dict(loaded, strict=True)


def float32_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Size of the weights as raw float32 values, bytes: what one model costs on the wire
    before any encoding overhead."""
    return 4 * sum(int(np.size(a)) for a in arrays.values())


# --- crops --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropSet:
    """A site's crops, kept at the site.

    Attributes
    ----------
    crops
        float32, (n_cases, z, y, x): see the module docstring for what a crop holds.
    case_ids, splits
        Per crop: the case and its split (``"train"`` or ``"test"``) from the prepared table.
    labels
        float64, (n_cases,): 0/1 for classification, label units for regression.
    skipped
        Case id -> reason, for prepared cases whose crop could not be made.
    cached
        Whether this set was read from the site's cache rather than computed.
    """

    crops: np.ndarray
    case_ids: tuple[str, ...]
    splits: tuple[str, ...]
    labels: np.ndarray
    skipped: dict[str, str]
    cached: bool = False

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Crops (n, z, y, x) and labels (n,) of one split."""
        keep = np.array([s == name for s in self.splits], dtype=bool)
        return self.crops[keep], self.labels[keep]


def crop_path(site: SiteConfig, protocol: StudyProtocol) -> Path:
    """Where the site keeps its crops for this study (never sent)."""
    from client.study import study_dir

    return study_dir(site, protocol) / "cnn" / CROP_FILE


def _crop_key(prepared: Path, protocol: StudyProtocol) -> str:
    """Content key of the crops: the prepared table's bytes, the crop rules, the crop size and
    the rest of the protocol (ingestion, standardization, task), but not the CNN's training
    settings, which do not change a crop."""
    h = hashlib.sha256()
    h.update(repr((CROP_SCHEMA_VERSION, _cnn_spec(protocol).crop_size, CROP_MARGIN_MM,
                   ROI_DILATION_MM, CLIP_SD,
                   protocol.model_copy(update={"cnn": None}).content_hash())).encode())
    h.update(prepared.read_bytes())
    return h.hexdigest()


def crop_volume(image: sitk.Image, roi: sitk.Image, intensity_roi: sitk.Image,
                crop_size: tuple[int, int, int]) -> np.ndarray:
    """One case's crop, float32 (z, y, x), from a standardized image and its ROI masks.

    Parameters
    ----------
    image
        Intensities on the standardized grid.
    roi, intensity_roi
        UInt8 0/1 masks on the same grid: the morphological ROI (where the crop is centred and
        what is kept) and the re-segmented one (whose voxels give the mean and SD).
    crop_size
        (x, y, z), voxels.
    """
    where = np.argwhere(sitk.GetArrayViewFromImage(roi) > 0)
    if where.size == 0:
        raise CaseError(SkipReason.EMPTY_MASK, "no ROI voxel to centre the crop on")
    lo, hi = where.min(axis=0)[::-1], where.max(axis=0)[::-1]  # x, y, z indices
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    n = np.asarray(crop_size, dtype=float)
    extent = (hi - lo + 1) * spacing + 2 * CROP_MARGIN_MM  # mm, x y z
    in_plane = max(extent[0] / n[0], extent[1] / n[1])
    new_spacing = np.array([in_plane, in_plane, extent[2] / n[2]])
    centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in (lo + hi) / 2.0])
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(centre) - direction @ ((n - 1) / 2.0 * new_spacing)

    def resample(item: sitk.Image) -> np.ndarray:
        out = sitk.Resample(sitk.Cast(item, sitk.sitkFloat32), [int(v) for v in crop_size],
                            sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                            new_spacing.tolist(), image.GetDirection(), 0.0, sitk.sitkFloat32,
                            True)  # nearest extrapolation: the box may overhang the grid
        return sitk.GetArrayFromImage(out)

    values = resample(image)
    inside = resample(roi) >= 0.5
    stats = resample(intensity_roi) >= 0.5
    if not stats.any():
        stats = inside
    if not stats.any():
        raise CaseError(SkipReason.MASK_TOO_SMALL, "the ROI vanishes at the crop's resolution")
    mean, sd = float(values[stats].mean()), float(values[stats].std())
    if not sd > 0:
        raise CaseError(SkipReason.STANDARDIZATION_FAILED, "the ROI is constant in the crop")
    radius = [int(round(ROI_DILATION_MM / s)) for s in new_spacing]  # x, y, z voxels
    kept = inside
    if any(radius):
        dilated = sitk.BinaryDilate(sitk.GetImageFromArray(inside.astype(np.uint8)), radius)
        kept = sitk.GetArrayFromImage(dilated) > 0
    z = np.clip((values - mean) / sd, -CLIP_SD, CLIP_SD)
    return np.where(kept, z, 0.0).astype(np.float32)


def _crop_case(job: tuple[CaseSpec, StudyProtocol, tuple[int, int, int]]
               ) -> tuple[str, np.ndarray | None, str]:
    """(case id, crop or None, reason): one case loaded, standardized and cropped."""
    from client.loading import load_case
    from client.standardize import build_steps, standardize

    case, protocol, crop_size = job
    try:
        volume = standardize(load_case(case, protocol), build_steps(protocol))
        crop = crop_volume(volume.image, volume.morphological_roi(),
                           volume.roi_for_intensity(), crop_size)
        return case.case_id, crop, ""
    except CaseError as exc:
        return case.case_id, None, f"{exc.reason.value}: {exc.detail}"
    except Exception as exc:  # a bug or an unforeseen file: skip the case, keep the others
        return case.case_id, None, f"{SkipReason.INTERNAL_ERROR.value}: {type(exc).__name__}: {exc}"


def _init_crop_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _crop_all(jobs: list[tuple[CaseSpec, StudyProtocol, tuple[int, int, int]]], workers: int
              ) -> list[tuple[str, np.ndarray | None, str]]:
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [_crop_case(job) for job in jobs]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_crop_worker) as pool:
        return list(pool.map(_crop_case, jobs))


def prepare_crops(site: SiteConfig, protocol: StudyProtocol) -> CropSet:
    """This site's crops of every case in its prepared table (phase 2), from the cache when the
    prepared table has not changed since they were made.

    Cases are loaded, standardized as for radiomics (:func:`client.standardize.build_steps`) and
    cropped (:func:`crop_volume`) in ``site.n_workers`` processes. A case that fails is skipped,
    its reason logged here and kept in :attr:`CropSet.skipped`; the others go on. The cache
    (``<study dir>/cnn/crops.npz``, NPZ with a schema version, written atomically) is keyed on the
    prepared table's bytes: a new preparation makes new crops.
    """
    from client.manifest import read_manifest
    from client.study import PREPARED_FILE, load_study_table, study_dir
    from common.provenance import atomic_write_bytes

    spec = _cnn_spec(protocol)
    prepared = study_dir(site, protocol) / PREPARED_FILE
    table = load_study_table(site, protocol, PREPARED_FILE)
    key = _crop_key(prepared, protocol)
    path = crop_path(site, protocol)
    cached = _read_crops(path, key)
    if cached is not None:
        return cached

    cases, _ = read_manifest(site.manifest, protocol, default_batch=site.site_name)
    by_id = {case.case_id: case for case in cases}
    label_column = protocol.task.label_column
    skipped: dict[str, str] = {}
    jobs, rows = [], []
    for case_id, split, label in zip(table["case_id"].astype(str), table["split"].astype(str),
                                     table[label_column].astype(float), strict=True):
        if case_id not in by_id:
            skipped[case_id] = "not_in_manifest: the manifest no longer lists this case"
            continue
        jobs.append((by_id[case_id], protocol, spec.crop_size))
        rows.append((split, label))
    crops, kept = [], []
    for (case_id, crop, reason), row in zip(_crop_all(jobs, site.n_workers), rows, strict=True):
        if crop is None:
            skipped[case_id] = reason
        else:
            crops.append(crop)
            kept.append((case_id, *row))
    for case_id, reason in skipped.items():
        log.warning("CNN crop of case '%s' skipped: %s", case_id, reason)
    x, y, z = spec.crop_size
    result = CropSet(
        crops=np.stack(crops) if crops else np.zeros((0, z, y, x), np.float32),
        case_ids=tuple(k[0] for k in kept), splits=tuple(k[1] for k in kept),
        labels=np.array([k[2] for k in kept], dtype=np.float64), skipped=skipped)
    buffer = io.BytesIO()
    np.savez(buffer, schema_version=np.array(CROP_SCHEMA_VERSION), key=np.array(key),
             crops=result.crops, case_ids=np.array(result.case_ids, dtype=str),
             splits=np.array(result.splits, dtype=str), labels=result.labels,
             skipped_ids=np.array(list(skipped), dtype=str),
             skipped_reasons=np.array(list(skipped.values()), dtype=str))
    atomic_write_bytes(path, buffer.getvalue())
    return result


def _read_crops(path: Path, key: str) -> CropSet | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["schema_version"]) != CROP_SCHEMA_VERSION or str(npz["key"]) != key:
                return None
            return CropSet(crops=npz["crops"], case_ids=tuple(npz["case_ids"].tolist()),
                           splits=tuple(npz["splits"].tolist()), labels=npz["labels"],
                           skipped=dict(zip(npz["skipped_ids"].tolist(),
                                            npz["skipped_reasons"].tolist(), strict=True)),
                           cached=True)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: recompute


# --- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetScale:
    """How regression labels map to the network's output: ``(label - center) / scale``."""

    center: float
    scale: float

    @classmethod
    def from_protocol(cls, protocol: StudyProtocol) -> TargetScale:
        """``task.value_range`` mapped to [-1, 1]: the same at every site, no data needed."""
        value_range = protocol.task.value_range
        if value_range is None:
            raise ConfigError("study protocol", [
                "task.value_range: the CNN scales regression labels by it; set it, or pass a "
                "TargetScale (e.g. the pooled mean and SD of the training labels)"])
        low, high = value_range
        return cls((low + high) / 2.0, (high - low) / 2.0)


@dataclass(frozen=True)
class TrainResult:
    """One site's local training in one round: what the server averages, and a summary.

    ``weights`` as :func:`state_arrays`; ``n_examples`` training crops (FedAvg's weight);
    ``loss`` the task loss (without the proximal term) averaged over every crop seen in the
    round's local epochs; ``seconds`` of wall time.
    """

    weights: dict[str, np.ndarray]
    n_examples: int
    loss: float
    seconds: float


def round_seed(seed: int, site_name: str, round_index: int) -> int:
    """The seed of one site's round: shuffling and augmentation differ between sites and
    rounds, and repeat exactly for the same study seed."""
    digest = hashlib.sha256(f"{seed}/{site_name}/{round_index}/cnn".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def augmentation(seed: int) -> Compose:
    """MONAI array transforms of one (1, z, y, x) crop: left-right and cranio-caudal flips,
    an in-plane rotation up to 15 degrees and a zoom of 0.9-1.1 (padding with 0, the ROI mean
    of a crop), seeded."""
    from monai.transforms import Compose, RandFlip, RandRotate, RandZoom

    transforms = Compose([
        RandFlip(prob=0.5, spatial_axis=2),  # x: left-right
        RandFlip(prob=0.5, spatial_axis=0),  # z: cranio-caudal
        # range_x rotates in the plane of the last two axes, (y, x): axial, as slices are thick
        RandRotate(range_x=math.radians(15), prob=0.5, padding_mode="zeros",
                   mode="bilinear"),
        RandZoom(prob=0.5, min_zoom=0.9, max_zoom=1.1, mode="trilinear",
                 padding_mode="constant", keep_size=True),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads limited to ``n`` inside the block, restored after: sites of a
    simulation share the machine (one worker each), a deployed site uses its ``workers``."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _targets(labels: np.ndarray, protocol: StudyProtocol, target: TargetScale | None
             ) -> np.ndarray:
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        return labels.astype(np.float32)
    scale = target or TargetScale.from_protocol(protocol)
    return ((labels - scale.center) / scale.scale).astype(np.float32)


def _loss_function(protocol: StudyProtocol) -> torch.nn.Module:
    if protocol.task.kind is TaskKind.CLASSIFICATION:
        return torch.nn.BCEWithLogitsLoss()
    return torch.nn.MSELoss()


def _adam(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """Adam, fused where this torch has it for the model's device (on the CPU: one pass over the
    14M weights of a ResNet-10 instead of ten, 10x faster a step); else the plain loop."""
    try:
        return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 on the CPU
        return torch.optim.Adam(model.parameters(), lr=learning_rate)


def _batches(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, z, y, x) crops as a (n, 1, z, y, x) float32 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(x[:, None])).to(device, non_blocking=True)


def train_round(site: SiteConfig, protocol: StudyProtocol, global_arrays: Mapping[str, np.ndarray],
                *, round_index: int, seed: int, device: torch.device | None = None,
                target: TargetScale | None = None) -> TrainResult:
    """Train the global model on this site's training crops for ``cnn.local_epochs`` epochs.

    Adam (``cnn.learning_rate``, fresh each round); BCE-with-logits (classification) or MSE on
    the scaled target (regression, :class:`TargetScale`); with ``cnn.aggregator == "fedprox"``
    the proximal term ``mu / 2 * ||w - w_global||^2`` over the parameters. Batches are split
    evenly (no batch of one when ``batch_size`` > 1). On CUDA: float16 autocast and a gradient
    scaler; on CPU: float32 and ``site.n_workers`` torch threads. Same seed, round and site on
    CPU: the same weights.

    Parameters
    ----------
    global_arrays
        The round's global weights, as :func:`state_arrays`.
    round_index, seed
        The round and the study seed: with the site name they seed shuffling and augmentation.
    device
        Default: :func:`select_device` of ``site.device``.
    target
        Regression only: default :meth:`TargetScale.from_protocol`.

    Raises
    ------
    ModelError
        Fewer than :data:`client.study.MIN_ROWS_SENT` training crops (weights fitted to so few
        patients would come close to describing them), or unusable global weights.
    """
    from client.study import MIN_ROWS_SENT
    from common.glm import ModelError

    start = time.perf_counter()
    spec = _cnn_spec(protocol)
    device = device or select_device(site.device)
    x, labels = prepare_crops(site, protocol).split("train")
    if len(labels) < MIN_ROWS_SENT:
        raise ModelError(f"site '{site.site_name}' has {len(labels)} training crops, fewer than "
                         f"{MIN_ROWS_SENT}: it sends no weights trained on them")
    y = _targets(labels, protocol, target)
    this_seed = round_seed(seed, site.site_name, round_index)
    cuda = device.type == "cuda"
    with torch_threads(site.n_workers), torch.random.fork_rng(devices=[]):
        torch.manual_seed(this_seed)
        model = build_network(spec, protocol.task.kind, seed=seed)
        load_state_arrays(model, global_arrays)
        model.to(device).train()
        anchor = [p.detach().clone() for p in model.parameters()]
        mu = spec.proximal_mu if spec.aggregator == "fedprox" else 0.0
        criterion = _loss_function(protocol)
        optimizer = _adam(model, spec.learning_rate)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        augment = augmentation(this_seed) if spec.augment else None
        rng = np.random.default_rng(this_seed)
        n = len(y)
        total, seen = 0.0, 0
        for _ in range(spec.local_epochs):
            order = rng.permutation(n)
            for batch in np.array_split(order, math.ceil(n / spec.batch_size)):
                xb = x[batch]
                if augment is not None:
                    xb = np.stack([np.asarray(augment(crop[None]))[0] for crop in xb])
                inputs = _batches(xb, device)
                yb = torch.from_numpy(y[batch]).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
                    output = model(inputs)
                loss = criterion(output.float().reshape(-1), yb)
                objective = loss
                if mu > 0:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                    objective = loss + mu / 2.0 * drift
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        model.cpu()
        weights = state_arrays(model)
    return TrainResult(weights, n, total / seen, time.perf_counter() - start)


# --- evaluation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one split's crops: numbers only, never a per-patient value.

    ``n`` crops and ``n_positive`` of them labelled 1 (classification; 0 for regression).
    ``loss`` as in training (BCE, or MSE on the scaled target); ``auc`` (classification, NaN
    with one class present); ``pearson_r`` and ``mae`` (regression, MAE in label units). Every
    metric is NaN below :data:`client.study.MIN_ROWS_SENT` crops.
    """

    n: int
    n_positive: int
    loss: float
    auc: float
    pearson_r: float
    mae: float


@dataclass(frozen=True)
class CnnMetrics:
    """A site's evaluation of one set of global weights: its test crops and, for training
    curves, its training crops (``None`` when not asked for)."""

    site: str
    test: SplitMetrics
    train: SplitMetrics | None
    seconds: float

    def as_record(self) -> dict[str, int | float]:
        """Flat ``{"test_auc": ..., "train_n": ...}``: what a metrics reply carries."""
        out: dict[str, int | float] = {}
        for prefix, metrics in (("test", self.test), ("train", self.train)):
            if metrics is not None:
                out.update({f"{prefix}_{k}": v for k, v in asdict(metrics).items()})
        out["seconds"] = self.seconds
        return out


def _predict(model: torch.nn.Module, x: np.ndarray, batch_size: int, device: torch.device
             ) -> np.ndarray:
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            inputs = _batches(x[start: start + batch_size], device)
            with torch.autocast(device_type=device.type, dtype=torch.float16,
                                enabled=device.type == "cuda"):
                outputs.append(model(inputs).float().reshape(-1).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros(0, np.float32)


def _split_metrics(protocol: StudyProtocol, labels: np.ndarray, output: np.ndarray,
                   target: TargetScale | None) -> SplitMetrics:
    from sklearn.metrics import roc_auc_score

    from client.study import MIN_ROWS_SENT

    from common.glm import ModelError

    nan = float("nan")
    classification = protocol.task.kind is TaskKind.CLASSIFICATION
    n, n_positive = len(labels), int(labels.sum()) if classification else 0
    if n < MIN_ROWS_SENT:
        return SplitMetrics(n, n_positive, nan, nan, nan, nan)
    if not np.all(np.isfinite(output)):
        raise ModelError(f"the model's output is not finite on {int(np.sum(~np.isfinite(output)))}"
                         f" of {n} crops: its weights have diverged")
    y = _targets(labels, protocol, target)
    with torch.no_grad():
        loss = float(_loss_function(protocol)(torch.from_numpy(output.astype(np.float32)),
                                              torch.from_numpy(y)))
    if classification:
        auc = float(roc_auc_score(labels, output)) if 0 < n_positive < n else nan
        return SplitMetrics(n, n_positive, loss, auc, nan, nan)
    scale = target or TargetScale.from_protocol(protocol)
    predicted = output.astype(np.float64) * scale.scale + scale.center
    r = float(np.corrcoef(predicted, labels)[0, 1]) if np.std(predicted) > 0 and np.std(
        labels) > 0 else nan
    return SplitMetrics(n, 0, loss, nan, r, float(np.mean(np.abs(predicted - labels))))


def evaluate_arrays(site: SiteConfig, protocol: StudyProtocol, arrays: Mapping[str, np.ndarray],
                    *, include_train: bool = True, device: torch.device | None = None,
                    target: TargetScale | None = None) -> CnnMetrics:
    """Metrics of the weights ``arrays`` on this site's test crops (and training crops, without
    augmentation, when ``include_train``), the network in eval mode (BatchNorm uses the
    running statistics the weights carry)."""
    start = time.perf_counter()
    spec = _cnn_spec(protocol)
    device = device or select_device(site.device)
    crops = prepare_crops(site, protocol)
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()

        def metrics(split: str) -> SplitMetrics:
            x, labels = crops.split(split)
            output = _predict(model, x, spec.batch_size, device)
            return _split_metrics(protocol, labels, output, target)

        test = metrics("test")
        train = metrics("train") if include_train else None
    return CnnMetrics(site.site_name, test, train, time.perf_counter() - start)


# --- the site's own view: full test metrics and Grad-CAM (kept at the site) ----------------------

#: The layer whose activations Grad-CAM weighs, by architecture (MONAI's module names).
CAM_LAYERS = {"resnet10": "layer4", "resnet18": "layer4", "densenet121": "class_layers.relu"}


@dataclass(frozen=True)
class CnnSiteView:
    """What the site keeps of the final global CNN: its test labels and outputs (logits, or
    predictions in label units), and Grad-CAM maps with the crops of a few test cases."""

    labels: np.ndarray
    output: np.ndarray
    shown: list[tuple[str, float]]  # (case id, label) of the cases with a Grad-CAM map
    crops: np.ndarray   # (k, z, y, x) of the cases shown
    cams: np.ndarray    # (k, z, y, x), each in [0, 1]


def site_view(site: SiteConfig, protocol: StudyProtocol, arrays: Mapping[str, np.ndarray],
              *, n_cams: int = 4, device: torch.device | None = None,
              target: TargetScale | None = None) -> CnnSiteView:
    """The final weights on this site's test crops, and MONAI's Grad-CAM (Selvaraju et al.
    2017) on up to ``n_cams`` of them (positives first, for classification): what the model
    looked at, for the site's own report."""
    from monai.visualize import GradCAM

    spec = _cnn_spec(protocol)
    device = device or select_device(site.device)
    crops = prepare_crops(site, protocol)
    x, labels = crops.split("test")
    ids = [c for c, s in zip(crops.case_ids, crops.splits) if s == "test"]
    with torch_threads(site.n_workers):
        model = build_network(spec, protocol.task.kind)
        load_state_arrays(model, arrays)
        model.to(device).eval()
        output = _predict(model, x, spec.batch_size, device).astype(np.float64)
        if protocol.task.kind is TaskKind.REGRESSION:
            scale = target or TargetScale.from_protocol(protocol)
            output = output * scale.scale + scale.center
        order = np.argsort(-labels, kind="stable")[:n_cams] if len(x) else np.zeros(0, int)
        cams = np.zeros((0, *x.shape[1:]), np.float32)
        if len(order):
            cam = GradCAM(nn_module=model, target_layers=CAM_LAYERS[spec.architecture])
            cams = cam(_batches(x[order], device), class_idx=0).detach().cpu().numpy()[:, 0]
    return CnnSiteView(labels, output, [(ids[i], float(labels[i])) for i in order], x[order],
                       cams.astype(np.float32))
