"""Validation metrics of a study: pure functions of labels and scores, with confidence intervals.

What a TRIPOD-style results table reports, computed where the scores are (a site's own test
rows); only the values returned here, and binned curves whose every bin holds at least the
protocol's minimum count, leave a site.

* **Discrimination**: AUC with its DeLong variance (the fast midrank algorithm of Sun & Xu,
  IEEE SPL 2014) and 95% CI, a stratified bootstrap CI, and DeLong's paired test of two models on
  the same patients (DeLong, DeLong & Clarke-Pearson, Biometrics 1988).
* **Classification at a threshold**: sensitivity, specificity, PPV, NPV, accuracy, F1 and the
  confusion matrix. The threshold is fixed on training data: :func:`youden_threshold` on a
  training table, or the training prevalence for a calibrated risk model (where the two agree:
  Youden's J is largest where the class densities are equal, which for a calibrated risk is
  where the risk equals the prevalence).
* **Calibration**: Brier score, calibration intercept (calibration-in-the-large, slope fixed at
  one) and slope by logistic recalibration (Cox 1958; Van Calster et al., JCE 2016), the
  calibration curve in bins of at least ``min_count`` patients.
* **Clinical utility**: the decision curve, net benefit against treat-all (Vickers & Elkin 2006).
* **Regression** (plasma-cell infiltration): Pearson and Spearman r with Fisher-z CIs (Bonett &
  Wright's variance for Spearman), MAE, RMSE, Bland-Altman bias and 95% limits of agreement.
* **Across sites**: the DerSimonian-Laird random-effects pooled estimate with its CI, Cochran's
  Q and I-squared (Higgins & Thompson 2002), for the forest plot of per-site AUCs.

Scores for the threshold and calibration metrics are predicted risks in (0, 1); AUC takes any
score. Arrays are 1-D, one value a patient.

The modules: :mod:`.discrimination`, :mod:`.threshold`, :mod:`.calibration` (with the decision
curve), :mod:`.regression` and :mod:`.pooling` as above; :mod:`.classification` and
:mod:`.regression` hold the table a site reports of one model and the keys it may hold;
:mod:`.base` the input checks and constants they share.
"""
