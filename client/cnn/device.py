"""The torch device and threads of a site's CNN work, and crops as tensors on that device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from common.errors import ConfigError


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


def crop_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, z, y, x) crops as a (n, 1, z, y, x) float32 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(x[:, None])).to(device, non_blocking=True)


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, anchor: list[torch.Tensor], mu: float) -> None:
    """One step on ``loss``, with FedProx's ``mu / 2 * ||w - w_0||^2`` to the round's start
    weights ``anchor`` when ``mu`` > 0, through the gradient scaler (float16 on CUDA)."""
    objective = loss
    if mu > 0:
        drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
        objective = loss + mu / 2.0 * drift
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(objective).backward()
    scaler.step(optimizer)
    scaler.update()
