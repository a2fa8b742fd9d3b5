"""The site's privacy guard and release ledger: what checking a reply costs, against what making
the reply costs.

Times :func:`client.guard.check_reply` on the two largest replies a site sends: the model's terms
for a full batch of fits (the default protocol's 240 fits: four training sets, each
``n_lambdas`` x (``cv_folds`` + 1), at ``screening_top_k`` features: a gradient and a Hessian
per fit) and a CNN update (the protocol's default network). The baseline
is packing the same reply into Flower's records (:func:`common.records.pack`, Flower's
``ArrayRecord``), which every reply costs anyway. The release ledger
(:func:`client.ledger.release`) is timed on the same model-terms reply at a site of 120 training
rows whose ledger already holds ComBat's sums (two scanners, each by label) and the comoments:
reading the ledger, the exact check of the span and writing it back.

    python bench/guard.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from client.guard import check_reply  # noqa: E402
from common.messages import MessageType  # noqa: E402
from common.protocol import protocol_from_mapping  # noqa: E402
from common.records import pack  # noqa: E402
from common.selection.terms import BatchRequest, site_batch_terms  # noqa: E402
from common.synthetic import Task  # noqa: E402
from common.synthetic.write import study_protocol_mapping  # noqa: E402


def best_ms(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    protocol = protocol_from_mapping(study_protocol_mapping(Task.DIAGNOSIS, "MR"))
    spec = protocol.model
    rng = np.random.default_rng(0)

    # the model's terms: every fit of the default protocol at once, for the federated training
    # set and each of three sites left out
    k, n, features, sets = spec.screening_top_k, 120, 400, 4
    per_set = spec.n_lambdas * (spec.cv_folds + 1)
    fits = sets * per_set
    request = BatchRequest(
        np.array([rng.choice(features, k, replace=False) for _ in range(sets)]),
        np.zeros((sets, k)), np.ones((sets, k)), np.repeat(np.arange(sets), per_set),
        np.tile(np.repeat(np.arange(-1, spec.cv_folds), spec.n_lambdas), sets),
        rng.normal(0, 0.1, (fits, 1 + k)))
    x, y = rng.normal(size=(n, features)), rng.integers(0, 2, n).astype(float)
    terms = site_batch_terms(x, y, np.arange(n) % spec.cv_folds, request, "logistic", 5)
    message = pack(request=request)
    reply = pack(terms=terms)
    rows = [("model terms", f"{fits} fits x (1 + {k})^2",
             best_ms(lambda: pack(terms=terms), args.repeat),
             best_ms(lambda: check_reply(MessageType.MODEL_TERMS, message, reply,
                                         lambda: protocol, lambda: features), args.repeat))]

    # the release ledger on the same reply: its subsets (all rows and each fold left out, each
    # split by label), in a ledger holding ComBat's and the comoments' subsets
    import tempfile

    from client.ledger import LEDGER_FILE, release

    folds = np.arange(n) % spec.cv_folds
    scanner = np.arange(n) < n // 2
    case_ids = [f"case{i:04d}" for i in range(n)]
    labels = [y == 0, y == 1]
    earlier = [part & s for s in (scanner, ~scanner, np.ones(n, bool)) for part in labels]
    released = [part & (folds != f) for f in range(-1, spec.cv_folds) for part in labels]
    with tempfile.TemporaryDirectory() as folder:
        release(Path(folder), "earlier", case_ids, earlier)
        start = (Path(folder) / LEDGER_FILE).read_text()

        def ledger() -> None:
            (Path(folder) / LEDGER_FILE).write_text(start)
            release(Path(folder), "model terms", case_ids, released)

        rows.append(("ledger", f"{len(released)} subsets of {n} rows",
                     best_ms(lambda: pack(terms=terms), args.repeat),
                     best_ms(ledger, args.repeat)))

    # a CNN update of the protocol's default network
    from common.network import build_network, state_arrays

    weights = state_arrays(build_network(protocol.cnn, protocol.task.kind))
    sent = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()})})

    def update() -> RecordDict:
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                           "metrics": MetricRecord({"num-examples": 40, "train_loss": 0.6}),
                           "site": ConfigRecord({"name": "site_A", "protocol_hash": "h"})})

    built = update()
    size = sum(v.nbytes for v in weights.values()) / 2**20
    rows.append(("CNN update", f"{len(weights)} tensors, {size:.1f} MiB",
                 best_ms(update, args.repeat),
                 best_ms(lambda: check_reply("train", sent, built, lambda: protocol,
                                             lambda: None), args.repeat)))

    print(f"{'reply':<12} {'size':<26} {'pack ms':>8} {'guard ms':>9} {'guard/pack':>11}")
    for name, what, packing, guard in rows:
        print(f"{name:<12} {what:<26} {packing:8.2f} {guard:9.2f} {guard / packing:10.2f}x")


if __name__ == "__main__":
    main()
