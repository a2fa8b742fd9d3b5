"""After the CNN: federated Harmony on its embeddings (``harmonization.embeddings``).

Each site kept its cases' embeddings under the final global network (:mod:`client.cnn.embed`).
One round gathers their sums, count and outer products (the same payload as CovBat's first
round) for their principal axes; Harmony's rounds then run on the projections
(:func:`harmonization.federated_harmony.harmony_rounds`, each request to every site at once);
a last round asks each site for its own scanners' LISI before and after. ``harmony.json`` gives
the run (scanners, clusters, iterations, rounds), the scanners' mixing within Harmony's
clusters before and after, and each site's LISI; the multicentre report shows it.

A site that cannot take part in the first round (no embeddings, too few) is named and left
out; one that fails a later round stops the run, named (its memberships are needed by every
later round), and the study goes on: Harmony here is a check of the CNN's embeddings, which no
later phase needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import HarmonizationError
from common.messages import MessageType, StudyConfig
from common.payloads import MIN_ROWS_SENT
from common.records import pack_request
from harmonization.covbat import PrincipalAxes, ResidualProducts, principal_axes
from harmonization.federated_harmony import (
    REPLY_NAMES,
    STEP_REPLIES,
    FederatedHarmonyOptions,
    HarmonyRequest,
    Reply,
)
from harmonization.harmony_server import harmony_rounds
from harmonization.messages import EmbeddingHarmonyRequest
from server.rounds import Transport, collect, exchange, study_config
from server.study import Progress, StudySettings

#: What the run wrote, in the coordinator's output folder.
HARMONY_FILE = "harmony.json"


class HarmonyStopped(Exception):
    """A site failed one of Harmony's rounds."""


def run_embedding_harmony(transport: Transport, nodes: dict[int, str], settings: StudySettings,
                          progress: Progress) -> dict[str, object]:
    """Harmony's rounds on the sites' CNN embeddings; what ``harmony.json`` holds."""
    spec = settings.protocol.harmonization.embeddings
    assert spec is not None  # the orchestrator runs this phase only when the protocol asks
    config = study_config(settings, seed=settings.seed)
    replies, failed = exchange(transport, nodes, MessageType.HARMONY_PRODUCTS,
                               lambda _: pack_request(EmbeddingHarmonyRequest(config)), settings)
    products = collect(replies, failed, "products", ResidualProducts)
    widths = {p.total.shape[0] for p in products.values()}
    if len(widths) > 1:
        return {"status": "not run", "reason": f"embeddings of different widths {widths}",
                "failed": failed}
    if len(products) < settings.min_sites:
        return {"status": "not run", "failed": failed,
                "reason": f"{len(products)} sites with embeddings, fewer than min-sites = "
                          f"{settings.min_sites}"}
    axes = principal_axes([products[s] for s in sorted(products)], n_pc=spec.n_components)
    taking_part = {n: s for n, s in sorted(nodes.items(), key=lambda i: i[1]) if s in products}
    progress(f"  Harmony on {len(taking_part)} sites' CNN embeddings: "
             f"{axes.components.shape[1]} components ({axes.explained:.0%} of their variance)")

    def ask(request: HarmonyRequest) -> Sequence[Reply]:
        return _round(transport, taking_part, settings, config, axes, request)

    try:
        # the server's floor for a scanner is the study's smallest sum; each site withholds
        # under its own, which is never lower
        trace = harmony_rounds(ask, FederatedHarmonyOptions.of(spec, settings.seed,
                                                               MIN_ROWS_SENT))
        mixing = ask(HarmonyRequest("mixing", clusters=trace.n_clusters))
    except (HarmonyStopped, HarmonizationError) as exc:
        progress(f"  Harmony stopped: {exc}")
        return {"status": "stopped", "reason": str(exc), "failed": failed}
    sites = {site: {"scanners": m.scanners, "lisi_before": m.before, "lisi_after": m.after}
             for site, m in zip(taking_part.values(), mixing, strict=True)}
    progress(f"  Harmony: {trace.iterations} iterations, {trace.rounds + 2} rounds; scanners' "
             f"mixing in its clusters {trace.diversity_before:.2f} -> "
             f"{trace.diversity_after:.2f} (at most {trace.diversity_ceiling:.2f})")
    return {"status": "done", "components": int(axes.components.shape[1]),
            "explained": round(axes.explained, 4), "scanners": list(trace.scanners),
            "dropped": list(trace.dropped), "clusters": trace.n_clusters,
            "iterations": trace.iterations, "rounds": trace.rounds + 2,
            "objective": [round(v, 4) for v in trace.objective],
            "sent_bytes": dict(zip(taking_part.values(), trace.sent_bytes, strict=True)),
            "cluster_mixing": {"before": trace.diversity_before,
                               "after": trace.diversity_after,
                               "ceiling": trace.diversity_ceiling},
            "sites": sites, "failed": failed, "theta": spec.theta, "sigma": spec.sigma}


def _round(transport: Transport, nodes: dict[int, str], settings: StudySettings,
           config: StudyConfig, axes: PrincipalAxes, request: HarmonyRequest
           ) -> Sequence[Reply]:
    """One request to every site taking part; their replies in the sites' order, or
    :class:`HarmonyStopped` naming the sites that failed."""
    content = pack_request(EmbeddingHarmonyRequest(
        config, axes if request.step == "counts" else None, request))
    replies, failed = exchange(transport, nodes, MessageType.HARMONY, lambda _: content,
                               settings)
    cls = STEP_REPLIES[request.step]
    parts = collect(replies, failed, REPLY_NAMES[cls], cls)
    if failed:
        raise HarmonyStopped(f"round '{request.step}': " + "; ".join(
            f"{site}: {reason}" for site, reason in sorted(failed.items())))
    return [parts[site] for site in nodes.values()]
