"""The reports' Jinja2 templates, as Python strings.

They live in a module, not in ``.j2`` data files, so that they travel with the study app: the
bundle Flower ships to every site (``flwr run``) holds only ``.py``, ``.toml``, ``.md``,
``.json`` and ``.yaml`` files, and a ClientApp in deployment imports ``common`` from that
bundle, where data files would be missing (every site report failed so). Rendered by
:mod:`common.templates`; each key is the name the templates use in ``extends``/``import``.
"""

from __future__ import annotations

BASE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}MyeloFed report{% endblock %}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
         max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1rem; }
  h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
  h2 { font-size: 1.25rem; border-bottom: 2px solid #1f77b4; padding-bottom: 0.2rem;
       margin-top: 2.2rem; }
  h3 { font-size: 1.05rem; margin-top: 1.4rem; }
  table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
  th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
  th { background: #f2f5f9; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .meta { color: #555; font-size: 0.9rem; }
  .warn { background: #fff4e5; border-left: 4px solid #ff9800; padding: 0.5rem 0.8rem; }
  .ok { background: #eef7ee; border-left: 4px solid #2ca02c; padding: 0.5rem 0.8rem; }
  figure { display: inline-block; margin: 0.6rem 1rem 0.6rem 0; vertical-align: top; }
  figure img { max-width: 100%; border: 1px solid #eee; }
  figcaption { font-size: 0.85rem; color: #444; }
  code { background: #f4f4f4; padding: 0 0.2rem; }
</style>
</head>
<body>
{% block body %}{% endblock %}
<p class="meta">Figures are inline: this page opens offline. Metrics come from each site's own test
rows; only values and curves binned to at least the protocol's minimum count left the sites.</p>
</body>
</html>
"""

MACROS = """\
{% macro figures(items) %}
{% for f in items %}
<figure><img src="{{ f.src }}" alt="{{ f.title }}"><figcaption>{{ f.title }}</figcaption></figure>
{% endfor %}
{% endmacro %}

{% macro mapping_table(rows, columns, headers=None) %}
<table>
<tr>{% for c in (headers or columns) %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in rows %}
<tr>{% for c in columns %}<td>{{ r[c] }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endmacro %}

{% macro reasons(what, items) %}
{% if items %}
<div class="warn"><strong>{{ what }}:</strong>
<ul>{% for k, v in items.items() %}<li><strong>{{ k }}</strong>: {{ v }}</li>{% endfor %}</ul></div>
{% endif %}
{% endmacro %}
"""

SITE = """\
{% extends "base.html.j2" %}
{% from "macros.html.j2" import figures, mapping_table %}
{% block title %}MyeloFed site report: {{ report.site }}{% endblock %}
{% block body %}
<h1>Site report: {{ report.site }}</h1>
<p class="warn">This report stays at the site: it shows this site's own patients (ROC curves,
skipped cases). Only the metrics in the multicentre report left the site.</p>
<p class="meta">Generated {{ report.generated }}. Study protocol <strong>{{ report.protocol }}</strong>,
hash <code>{{ report.protocol_hash[:12] }}</code>.
Software: {% for k, v in report.versions.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>

<h2>Cohort and ingestion</h2>
{% if report.prepare %}
{% set r = report.prepare.reply %}
<table>
<tr><th>status</th><th>training cases</th><th>test cases</th><th>training labels</th><th>test labels</th><th>scanners (training count)</th><th>features</th></tr>
<tr><td>{{ r.status }}</td><td class="num">{{ r.n_train }}</td><td class="num">{{ r.n_test }}</td>
<td>{{ r.train_labels }}</td><td>{{ r.test_labels }}</td><td>{{ r.batches }}</td><td class="num">{{ r.n_features }}</td></tr>
</table>
{% if report.prepare.skipped_cases %}
<h3>Skipped cases ({{ report.prepare.skipped_cases | length }})</h3>
{{ mapping_table(report.prepare.skipped_cases, ["case_id", "row", "reason", "detail"]) }}
{% else %}
<p class="ok">No case was skipped.</p>
{% endif %}
{% else %}
<p>The preparation has not run here.</p>
{% endif %}

{% if report.segmentation %}
{% set sg = report.segmentation %}
<h2>Segmentation network</h2>
<p>The study's network on this site's held-out hand-drawn masks (mean and 95% bootstrap CI over
the test cases; the per-case figures stay here):</p>
<table>
<tr><th>label</th><th>Dice [95% CI]</th><th>HD95 mm [95% CI]</th></tr>
{% for r in sg.summary %}<tr><td>{{ r.label }} {{ r.name }}</td>
<td>{% if r.dice[0] == r.dice[0] and r.dice[0] is not none %}{{ "%.3f [%.3f, %.3f]" | format(r.dice[0], r.dice[1], r.dice[2]) }}{% else %}n/a{% endif %}</td>
<td>{% if r.hd95[0] == r.hd95[0] and r.hd95[0] is not none %}{{ "%.2f [%.2f, %.2f]" | format(r.hd95[0], r.hd95[1], r.hd95[2]) }}{% else %}n/a{% endif %}</td></tr>
{% endfor %}
</table>
{% if sg.icc and sg.icc.share is not none %}
<p>Radiomic features from the network's masks against the hand-drawn ones (the test cases,
ICC(3,1) per feature): {{ "%.0f%%" | format(100 * sg.icc.share) }} of {{ sg.icc.features }}
features at {{ sg.icc.good }} or above. The least reliable:
{% for name, value in sg.icc.lowest %}{{ name }} ({{ "%.2f" | format(value) }}){% if not loop.last %}, {% endif %}{% endfor %}.</p>
{% endif %}
{% if sg.auto %}
<h3>Masks made for the cases without one ({{ sg.auto | length }})</h3>
<table><tr><th>case</th><th>mask made (used)</th><th>refused because</th></tr>
{% for case, entry in sg.auto.items() %}<tr><td>{{ case }}</td><td>{{ entry.get("mask", "") }}</td><td>{{ entry.get("reason", "") }}</td></tr>
{% endfor %}</table>
{% endif %}
{{ figures(sg.overlays) }}
{% endif %}

{% if report.harmonization %}
<h2>Harmonization diagnostics</h2>
{% if report.harmonization.note is defined %}
<p>{{ report.harmonization.note }} (scanner: {{ report.harmonization.scanners | join(", ") }}).</p>
{% else %}
<p>Features differing between this site's scanners {{ report.harmonization.scanners | join(" and ") }}
(Kruskal-Wallis p &lt; 0.05, training rows, class means removed):
before ComBat {{ "%.0f%%" | format(100 * report.harmonization.before) }}{% if report.harmonization.after is defined %},
after {{ "%.0f%%" | format(100 * report.harmonization.after) }}{% endif %}.</p>
{% endif %}
{% endif %}

{% for e in report.evaluations %}
<h2>Models on this site's test rows: {{ e.title }}</h2>
{% if e.rows and e.rows[0].c_harrell is defined %}
{{ mapping_table(e.rows, ["model", "events", "c_harrell", "c_uno", "auc_at", "brier_at", "integrated_brier"],
                 ["model", "test events", "Harrell's C [bootstrap CI]", "Uno's C [CI]", "AUC at months", "Brier at months", "integrated Brier"]) }}
{% elif e.rows and e.rows[0].auc is defined %}
{{ mapping_table(e.rows, ["model", "auc", "boot", "threshold", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "calibration_slope", "confusion"],
                 ["model", "AUC [DeLong 95% CI]", "bootstrap CI", "threshold", "sens.", "spec.", "PPV", "NPV", "F1", "Brier", "cal. slope", "confusion matrix"]) }}
{% else %}
{{ mapping_table(e.rows, ["model", "r", "spearman", "mae", "rmse", "bias", "loa_low", "loa_high"],
                 ["model", "Pearson r [CI]", "Spearman ρ", "MAE", "RMSE", "bias", "LoA low", "LoA high"]) }}
{% endif %}
{% if e.get("site_update") %}
<p>Site-updated: the federated model updated on this site's training rows; this site's
cross-validation chose <strong>{{ e.site_update.choice }}</strong> (held-out deviance per
candidate: {{ e.site_update.deviance }}). It stays here.</p>
{% endif %}
{% if e.comparisons %}
<h3>DeLong's paired tests</h3>
{{ mapping_table(e.comparisons, ["pair", "difference", "z", "p"], ["models", "AUC difference", "z", "p"]) }}
{% endif %}
{{ figures(e.figures) }}
{% endfor %}
{% endblock %}
"""

MULTICENTRE = """\
{% extends "base.html.j2" %}
{% from "macros.html.j2" import figures, mapping_table, reasons %}
{% block title %}MyeloFed multicentre report{% endblock %}
{% block body %}
<h1>Multicentre validation report</h1>
<p class="meta">Generated {{ report.generated }} from <code>{{ report.out_dir }}</code>.
Protocol hash <code>{{ report.protocol_hash[:12] }}</code>.
Software: {% for k, v in report.versions.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>
{% if report.status.status == "done" %}
<p class="ok">Study finished{% if report.status.until %} (phases up to {{ report.status.until }}){% endif %}.</p>
{% else %}
<p class="warn">Study {{ report.status.status }}: {{ report.status.reason }}</p>
{% endif %}

<h2>Cohort</h2>
{{ mapping_table(report.cohort, ["site", "status", "hash", "usable", "skipped", "labels", "reason"],
                 ["site", "status", "protocol hash at the site", "usable cases", "skipped (reason:count)", "labels (class:count)", "reason"]) }}
{% if report.segmentation %}
{% set sg = report.segmentation %}
<h2>Segmentation network ({{ sg.architecture }}, {{ sg.aggregator }}, {{ sg.rounds }} rounds)</h2>
<p>Trained by {{ sg.trained_on.sites | join(", ") or "no site" }} on {{ sg.trained_on.cases }} hand-drawn masks; each site scored it on its own held-out masks and made the masks of its cases without one. The feature agreement is each site's, over its own test cases. A mask made is used only when it passes quality control (not empty, not fragmented, a volume within the training masks' range{% for l in sg.labels %}{% if sg.volume_ml[l.value|string] %}; {{ l.name }} {{ "%.1f"|format(sg.volume_ml[l.value|string][0]) }}-{{ "%.1f"|format(sg.volume_ml[l.value|string][1]) }} ml{% endif %}{% endfor %}); the features table marks those cases (<code>mask_source = auto</code>).</p>
{{ mapping_table(sg.rows, sg.columns, sg.headers) }}
{{ reasons("Sites not scored with the segmentation network", sg.failed) }}
{{ figures(sg.figures) }}
{% endif %}

{% if report.split %}
<h3>Local train/test split</h3>
{{ mapping_table(report.split, ["site", "n_train", "n_test", "train_labels", "test_labels", "batches"],
                 ["site", "train", "test", "train labels", "test labels", "scanners (training count)"]) }}
{% endif %}
{{ reasons("Excluded sites", report.excluded) }}

{% if report.protocol %}
<details><summary>The study protocol and run settings (hash <code>{{ report.protocol.hash[:12] }}</code>)</summary>
<pre>{{ report.protocol | tojson(indent=2) }}</pre>
</details>
{% endif %}

{% if report.images %}
<h2>Image harmonization (federated histogram standardization)</h2>
<p>Each image's intensity percentiles inside the body, after N4 and normalization, are mapped
piecewise linearly onto the study's standard landmarks: the mean over every site's training
images (mapped so that the 1st percentile is 0 and the 99th {{ report.images.scale }}). Per
scanner, its training images' mean landmarks before the mapping{% if "noise" in report.images.columns %},
and their mean noise level (in the landmarks' units) and voxel spacing: with acquisition
matching, every image is then smoothed to the coarsest scanner's resolution, or gets noise up
to the noisiest scanner's level, or both, as the protocol asks (the targets in the last row;
"not matched" where it does not){% endif %}:</p>
{{ mapping_table(report.images.rows, report.images.columns, report.images.columns) }}
<img src="{{ report.images.figure }}" alt="Body histogram landmarks per scanner">
{{ reasons("Scanners of too few training images at a site (their images are standardized; they did not shape the standard)", report.images.left_out) }}
{{ reasons("Sites whose landmarks are missing (their images are standardized onto the standard all the same)", report.images.missing) }}
{% endif %}

{% if report.combat %}
<h2>Harmonization (federated ComBat)</h2>
{% if report.combat.status == "not run" %}
<p>ComBat did not run: {{ report.combat.reason }}. The models use raw features at every site.</p>
{% else %}
<p>Scanners: {{ report.combat.batches | join(", ") }}.
Protected covariates: {{ (report.combat.covariates.categorical + report.combat.covariates.continuous) | join(", ") or "none" }}{% if report.combat.covariates.estimation_only %}
(of which {{ report.combat.covariates.estimation_only | join(", ") }} only while estimating the scanner effects: a row is harmonized without its label){% endif %}.
Scanners shared by several sites: {{ report.combat.shared_batches | join(", ") or "none" }}.</p>
{% set covbat = report.combat.get("covbat") or {} %}
{% if covbat.get("status") == "done" %}
<p>CovBat after ComBat: the scanner effects removed from the scores of the pooled residuals'
{{ covbat.components }} leading principal components ({{ "%.0f" | format(100 * covbat.explained) }}% of their variance).</p>
{% elif covbat.get("status") == "not run" %}
<p>CovBat did not run: {{ covbat.reason }}. The sites applied ComBat alone.</p>
{% endif %}
{% endif %}
{{ reasons("ComBat failures (these sites' models use raw features)", report.combat.failed) }}
{% set diagnostic = report.combat.get("scanner_features") or {} %}
{% if diagnostic %}
<h3>Features that differ between a site's own scanners</h3>
<p>At a site with two scanners or more, the share of its features whose training rows still
differ between them (Kruskal-Wallis p &lt; 0.05 on each feature less its class mean, so that
case mix does not count), on the features as prepared{% if report.images %} (after the image
harmonization above){% endif %} and after {{ "ComBat and CovBat" if (report.combat.get("covbat") or {}).get("status") == "done" else "ComBat" }}.
About 5% differ by chance alone.</p>
<table>
<tr><th>site</th><th>features tested</th><th>prepared</th><th>harmonized</th></tr>
{% for site, d in diagnostic | dictsort %}
<tr><td>{{ site }}</td>{% if d %}<td class="num">{{ d.tested }}</td>
<td class="num">{{ "%.1f%%" | format(100 * d.before) }}</td><td class="num">{{ "%.1f%%" | format(100 * d.after) }}</td>
{% else %}<td colspan="3">not measured: one scanner at the site, or one of fewer training rows than the site's minimum</td>{% endif %}</tr>
{% endfor %}
</table>
{% endif %}
{% if report.harmonization_change %}
<h3>What harmonization changed at each site</h3>
<p>Test {{ report.harmonization_change.metric }} of the federated model and of the model trained without the site (its external validation), on raw and on harmonized features.</p>
{{ mapping_table(report.harmonization_change.rows, ["site", "federated_raw", "federated_harmonized", "federated_change", "loso_raw", "loso_harmonized", "loso_change"], ["site", "federated, raw", "federated, harmonized", "change", "leave-site-out, raw", "leave-site-out, harmonized", "change"]) }}
{% endif %}
{% endif %}

{% for m in report.models %}
<h2>Radiomics model — {{ m.label }}</h2>
<h3>{{ m.metric }} per site (95% CI, DeLong for AUC)</h3>
<table>
<tr><th>site</th><th>test n</th><th>local-only</th><th>federated</th><th>site-updated</th><th>leave-site-out</th><th>p (federated vs local, DeLong)</th><th>recommended at the site, and why</th></tr>
{% for r in m.rows %}
<tr><td>{{ r.site }}</td><td class="num">{{ r.n_test }}</td><td class="num">{{ r.local }}</td>
<td class="num">{{ r.federated }}</td><td class="num">{{ r.site_updated }}</td><td class="num">{{ r.leave_site_out }}</td><td class="num">{{ r.p_federated_vs_local }}</td><td>{{ r.recommended }}</td></tr>
{% endfor %}
</table>
<p>Site-updated: the federated model updated on the site's own training rows (recalibrated,
revised towards its coefficients, or the site's local model: whichever the site's own
cross-validation preferred, by held-out deviance, a loss summed over its training rows; lower
is better). That choice is the site's recommended model: it is made without the test rows, so
its test metric is an honest estimate. The model stays at the site; its choice and the
candidates' deviances are all that leave.</p>
{% if m.pooled %}
<h3>Pooled across sites (random effects, DerSimonian-Laird)</h3>
{{ mapping_table(m.pooled, ["model", "estimate", "ci", "i2", "tau2", "p", "sites"],
                 ["model", "pooled", "95% CI", "I²", "τ²", "p (heterogeneity)", "sites pooled"]) }}
<p class="meta">A site whose metric has no variance (e.g. an AUC of 1 on a small test set) is shown
but not pooled.</p>
{% endif %}
{% if m.threshold_rows is defined %}
<h3>Federated model at its threshold (the training prevalence)</h3>
{{ mapping_table(m.threshold_rows, ["site", "threshold", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "brier", "calibration_intercept", "calibration_slope", "confusion"],
                 ["site", "threshold", "sens.", "spec.", "PPV", "NPV", "acc.", "F1", "Brier", "cal. intercept", "cal. slope", "confusion matrix"]) }}
{% endif %}
{% if m.survival_rows is defined %}
<h3>Federated Cox model: discrimination and accuracy over time</h3>
{{ mapping_table(m.survival_rows, ["site", "events", "c_harrell", "c_uno", "tau", "auc_at", "brier_at", "integrated_brier"],
                 ["site", "test events", "Harrell's C [bootstrap CI]", "Uno's C [CI]", "Uno's τ (months)", "cumulative/dynamic AUC at months", "Brier score at months", "integrated Brier"]) }}
<p>Stratified by site: each site's baseline hazard is its own (Breslow's, from its training rows,
never sent); the predicted survival at a site is that baseline to the power of the federated
model's relative hazard. Times at or after a site's last follow-up are n/a.</p>
{% if m.survival_calibration %}
<h3>Federated Cox model: calibration in risk groups</h3>
{{ mapping_table(m.survival_calibration, ["site", "time", "group", "n", "predicted", "observed"],
                 ["site", "months", "predicted risk group", "patients", "mean predicted survival", "Kaplan-Meier"]) }}
<p class="meta">A Kaplan-Meier value is n/a where fewer than the protocol's min_count are still at
risk.</p>
{% endif %}
{% endif %}
{% if m.regression_rows is defined %}
<h3>Federated model: agreement</h3>
{{ mapping_table(m.regression_rows, ["site", "r", "spearman", "mae", "rmse", "bias", "loa"],
                 ["site", "Pearson r [CI]", "Spearman ρ [CI]", "MAE", "RMSE", "Bland-Altman bias", "limits of agreement"]) }}
{% endif %}
<p>Selected features: {{ m.selected | join(", ") or "none" }}.</p>
{{ reasons("Sites that failed in this phase", m.failed) }}
{{ figures(m.figures) }}
{% endfor %}

{% if report.nomogram %}
<h2>Nomogram (radiomics score + clinical factors)</h2>
{% if report.nomogram.status == "done" %}
<p>The federated nomogram's {{ report.nomogram.ratio_name }}s [95% CI]: {% for t, v in report.nomogram.ratios.items() %}{{ t }} {{ v }}{% if not loop.last %}; {% endif %}{% endfor %}.</p>
{% for site, why in report.nomogram.get("left_out", {}).items() %}
<p class="warn">{{ site }} scored the nomograms but was left out of their fits: {{ why }}</p>
{% endfor %}
{{ mapping_table(report.nomogram.rows, ["site", "n_test", "nomogram", "site_updated", "leave_site_out", "recommended"],
                 ["site", "test n", report.nomogram.metric ~ " [CI]", "updated at the site", "trained without the site", "recommended at the site, and why"]) }}
{{ figures(report.nomogram.figures) }}
{% else %}
<p class="warn">Nomogram: {{ report.nomogram.status }}</p>
{% endif %}
{% endif %}

{% if report.repeats %}
{% set rp = report.repeats %}
<h2>Repeated splits ({{ rp.finished }} of {{ rp.total }} finished)</h2>
<p>The radiomics models again on each split of the study's cross-validation (<code>validation.repeats</code>): each site's cases fall into {{ rp.total }} folds of privacy atoms, each fold is the test set once. Each model's test {{ rp.metric }} per site: mean ± SD over the splits, with how many scored it (a split whose test rows at the site hold one class scores none). "Highest mean" names the model a site could use (alone, federated, federated + ComBat, site-updated) with the highest mean; a difference within the SDs is no evidence either way. The tables above are of the first split.</p>
{{ mapping_table(rp.rows, rp.columns, rp.headers) }}
{% for site, n in rp.few.items() %}<p class="warn">At {{ site }} only {{ n }} of the {{ rp.finished }} finished splits scored a model (its other test folds hold one class): its means and SDs rest on those {{ n }}.</p>{% endfor %}
{% for r, why in rp.stopped.items() %}
<p class="warn">Split {{ r }} did not finish: {{ why }}</p>
{% endfor %}
{% endif %}

{% if report.cnn %}
<h2>3D CNN ({{ report.cnn.architecture }}, {{ report.cnn.aggregator }}, {{ report.cnn.rounds }} rounds)</h2>
{% if report.cnn.final %}
{{ mapping_table(report.cnn.final, ["site"] + report.cnn.final_keys) }}
{% endif %}
{% if report.cnn.leave_site_out %}
<h3>The CNN trained without each site, scored there</h3>
<p>One federation per site with the other sites alone (the same rounds, from the same initial
network): external validation at a site the model never saw.</p>
{{ mapping_table(report.cnn.leave_site_out, ["site", "test_n", "test_auc", "test_pearson_r", "note"]) }}
{% endif %}
{% if report.cnn.privacy.mechanism != "none" %}
<h3>Differential privacy of the sites' updates</h3>
<p>{{ report.cnn.privacy.mechanism }}: clipping norm {{ report.cnn.privacy.clipping_norm }},
noise standard deviation {{ "%.3g" | format(report.cnn.privacy.noise_std) }};
each round a site sends an update is ({{ report.cnn.privacy.epsilon_per_round }},
{{ report.cnn.privacy.delta_per_round }})-differentially private for that site; a site's total
over the rounds it sent, by {{ report.cnn.privacy.composition }}:</p>
{{ mapping_table(report.cnn.privacy.rows, ["site", "rounds sent", "epsilon", "delta"]) }}
{% else %}
<p>The sites' CNN updates were sent without differential privacy (protocol: <code>cnn.local_dp</code>).</p>
{% endif %}
{{ reasons("Sites not scored with the final CNN (an update was refused)", report.cnn.failed) }}
{% if report.cnn.left_out %}
<h3>Rounds a site was left out of</h3>
<p>Dropped: the site did not answer (it is asked again the next round). Excluded: its update was
refused (malformed, or under another protocol).</p>
{{ mapping_table(report.cnn.left_out, ["round", "site", "kind", "reason"]) }}
{% endif %}
{{ figures(report.cnn.figures) }}
{% endif %}

{% if report.harmony %}
{% set hm = report.harmony %}
<h2>Harmony on the CNN's embeddings</h2>
{% if hm.status == "done" %}
<p>Federated Harmony (Korsunsky et al. 2019; <code>harmonization.embeddings</code>) on the {{ hm.components }} leading principal components of the final CNN's embeddings ({{ hm.explained }} of their variance): {{ hm.scanners }} scanners, {{ hm.clusters }} clusters, {{ hm.iterations }} iteration(s) in {{ hm.rounds }} rounds; the sites sent sums only.
The scanners' mixing within Harmony's clusters (each cluster's inverse Simpson index of its scanners' shares, weighted by the cluster's size; {{ hm.ceiling }} if every cluster held every scanner in its share of the cases): {{ hm.before }} before, {{ hm.after }} after.
Each site's LISI of its own scanners among its own embeddings (1: one scanner, or scanners apart; the number of scanners: fully mixed):</p>
{{ mapping_table(hm.rows, ["site", "scanners", "LISI before", "LISI after"]) }}
{% if hm.dropped %}<p class="warn">Scanners with too few embeddings, left as they were: {{ hm.dropped | join(", ") }}</p>{% endif %}
{% else %}
<p class="warn">Harmony {{ hm.status }}: {{ hm.reason }}</p>
{% endif %}
{{ reasons("Sites without Harmony", hm.failed) }}
{% endif %}
{% endblock %}
"""

#: Template name -> source.
TEMPLATES: dict[str, str] = {
    "base.html.j2": BASE,
    "macros.html.j2": MACROS,
    "site.html.j2": SITE,
    "multicentre.html.j2": MULTICENTRE,
}
