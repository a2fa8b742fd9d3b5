"""ComBat, split where the data lives: federated ComBat equal to centralized ComBat.

The model and its options follow Johnson et al. (2007) as implemented in Fortin's neuroCombat:
a design of batch indicators (no intercept), categorical covariates (first level dropped) and
continuous covariates; the grand mean weighted by batch size (or a reference batch's); the pooled
variance over all rows (or the reference batch's); parametric or non-parametric empirical Bayes,
``mean_only``, no EB. The distributed scheme is d-ComBat's (Chen et al., NeuroImage 2022):

1. each site sends ``n``, ``X'X`` and ``X'Y`` (:func:`site_design_moments`); the server solves
   for the coefficients (:func:`combine_design_moments`);
2. each site sends per-batch residual sums of squares (:func:`site_residual_moments`); the
   server returns the pooled variance (:func:`combine_residual_moments`);
3. each site standardizes its rows and summarizes each batch by its count, mean and centred sum
   of squares (:func:`site_batch_moments`). A batch held by one site is adjusted there
   (:func:`estimate_batch_adjustment`); a batch spread over sites is combined by the server
   (:func:`combine_batch_moments`) and adjusted there. Both EB variants depend on a batch's rows
   only through these three numbers per feature, so the result is the same.
4. each site applies the fitted :class:`CombatModel` to its own rows, training and held-out.

The modules: :mod:`.design` (the options, the design matrix and its JSON), :mod:`.moments`
(what the sites send and what the server combines, rounds 1 to 3), :mod:`.eb` (a batch's
empirical Bayes adjustment) and :mod:`.model` (the fitted model and :func:`fit_combat`).

Nothing here does I/O or knows about Flower; :func:`fit_combat` drives the halves in-process.
Every array that leaves a site is indexed by design column, batch or feature, never by patient.
Arrays are samples x features (``(n_samples, n_features)``), float64.
"""
