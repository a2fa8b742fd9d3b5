"""The typed request of federated ComBat's rounds (its payloads are this package's).

Round 1 (``combat_design``) carries the design only; round 2 (``combat_residuals``) adds the
pooled location fit; round 3 (``combat_moments``, for batches shared by sites) adds the pooled
variance and names the shared batches; the last (``combat_apply``) adds the shared batches'
adjustments, and a site answers it with :class:`HarmonizedRows`. Packed and checked by
:mod:`common.records`.

With CovBat (:mod:`harmonization.covbat`), the ComBat fitted on the features travels in the
``combat_*`` fields of every later request: ``covbat_products`` asks for the sums of its
residuals; the same three rounds then run again on the residuals' scores along the pooled
``axes`` (the request's ``fit``, ``var`` and ``shared`` are then the scores'), and the last
round applies both.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from common.messages import StudyConfig
from harmonization.combat.design import CombatOptions, Design, design_from_json
from harmonization.combat.eb import StackedAdjustments
from harmonization.combat.moments import LocationFit, PooledVariance
from harmonization.covbat import PrincipalAxes
from harmonization.federated_harmony import HarmonyRequest


@dataclass(frozen=True)
class CombatRequest:
    """A ComBat round's request: the study (with the design as JSON) and what the rounds
    before it pooled."""

    study: StudyConfig
    fit: LocationFit | None = None
    var: PooledVariance | None = None
    shared: StackedAdjustments | None = None
    combat_fit: LocationFit | None = None
    combat_var: PooledVariance | None = None
    combat_shared: StackedAdjustments | None = None
    axes: PrincipalAxes | None = None

    def design(self) -> tuple[Design, CombatOptions]:
        """The study's ComBat design and options (of the features: CovBat's scores have their
        own, :func:`harmonization.covbat.score_design`)."""
        if self.study.design is None:
            raise ConfigError("ComBat request", ["carries no design"])
        return design_from_json(self.study.design)

    def combat(self) -> tuple[LocationFit, PooledVariance, StackedAdjustments]:
        """CovBat's rounds: the ComBat fitted on the features, as the coordinator pooled it."""
        if self.combat_fit is None or self.combat_var is None or self.combat_shared is None:
            raise ConfigError("CovBat request", ["carries no fitted ComBat"])
        return self.combat_fit, self.combat_var, self.combat_shared

    def pooled(self) -> tuple[LocationFit, PooledVariance]:
        """The pooled location fit and variance (rounds 3 and 4)."""
        if self.fit is None or self.var is None:
            raise ConfigError("ComBat request", ["carries no pooled fit and variance"])
        return self.fit, self.var


@dataclass(frozen=True)
class HarmonizedRows:
    """A site's answer to ComBat's last round: how many of its rows (training and test) it
    harmonized and keeps; and the diagnostic of its own scanners (the site report's) on its
    training rows: of the ``tested`` features, how many differ between them before
    (``differing_before``) and after (``differing_after``) harmonization. ``tested`` is 0
    where it was not measured: one scanner at the site, or one of fewer than the site's
    ``min_patients`` training rows."""

    rows: int
    tested: int = 0
    differing_before: int = 0
    differing_after: int = 0

    def scanner_features(self) -> dict[str, float] | None:
        """The shares of the tested features that differ between the site's scanners, or None
        where it was not measured."""
        if self.tested == 0:
            return None
        return {"tested": self.tested, "before": self.differing_before / self.tested,
                "after": self.differing_after / self.tested}


@dataclass(frozen=True)
class EmbeddingHarmonyRequest:
    """A round of federated Harmony on the CNN's embeddings (``harmonization.embeddings``):
    without ``request``, the sums of the site's embeddings for their principal axes; then one
    of Harmony's requests (:class:`~harmonization.federated_harmony.HarmonyRequest`, whose
    ``counts`` step comes with the ``axes`` to project the embeddings on)."""

    study: StudyConfig
    axes: PrincipalAxes | None = None
    request: HarmonyRequest | None = None
