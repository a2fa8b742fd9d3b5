"""The federated CNN's network, as both sides make and exchange it (phase 5).

The server and every site build the same MONAI network from the protocol's ``cnn`` section and
the study seed (:func:`build_network`); its weights travel as named numpy arrays
(:func:`state_arrays`, :func:`load_state_arrays`). Pure torch and MONAI, independent of Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.networks.nets.densenet import DenseNet121
from monai.networks.nets.resnet import resnet10, resnet18

from common.errors import ConfigError
from common.glm import ModelError
from common.protocol import CnnSpec, TaskKind


def build_network(spec: CnnSpec, task_kind: TaskKind, *, seed: int = 0) -> torch.nn.Module:
    """The MONAI 3D network of ``spec.architecture`` with one input channel and one output (a
    logit for classification, a scaled value for regression; ``task_kind`` does not change the
    network, only how the site's training reads its output). No pretrained weights.

    The initial weights are a function of ``seed`` alone (the global torch RNG is left as it
    was): the server and every site build the same model. A crop too small for the network's
    downsampling is a :class:`ConfigError`.
    """
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


def norm_names(model: torch.nn.Module) -> frozenset[str]:
    """The state names of the model's normalization layers (BatchNorm weights, biases, running
    statistics and batch counters): what FedBN (``cnn.local_norm``) keeps at each site."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            names |= {f"{prefix}.{name}" if prefix else name for name in module.state_dict()}
    return frozenset(names)


def shared_arrays(spec: CnnSpec, model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's arrays that travel: all of them, or with ``spec.local_norm`` (FedBN) all but
    the normalization layers'."""
    arrays = state_arrays(model)
    if not spec.local_norm:
        return arrays
    local = norm_names(model)
    return {name: array for name, array in arrays.items() if name not in local}


def float32_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Size of the weights as raw float32 values, bytes: what one model costs on the wire
    before any encoding overhead."""
    return 4 * sum(int(np.size(a)) for a in arrays.values())
