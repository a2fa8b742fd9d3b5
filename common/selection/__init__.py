"""Federated feature selection and penalized GLMs, fitted many at a time.

A radiomics model is chosen the way a pooled study would choose it, from sums the sites send:

1. **screening** (:class:`Comoments`): each site sends per-feature counts, means, centred sums of
   squares and centred cross-products with the label; combined exactly (Chan et al.), they give
   the pooled standardization and each feature's Pearson correlation with the label
   (point-biserial for a binary label, monotone in Student's t). The ``top_k`` largest |r| go on.
2. **a penalized GLM** on the pooled-standardized screened features: logistic (classification)
   or Gaussian (regression), with an L1 (LASSO) or L2 (ridge) penalty on every coefficient but
   the intercept. The objective is ``sum(loss) / n + penalty``: scikit-learn's ``Lasso(alpha=lam)``
   for the Gaussian L1 case, ``LogisticRegression(C=1 / (n * lam))`` for the logistic ones.
3. **the penalty by cross-validation**: each site splits its training rows into folds (seeded,
   stratified); a fit "without fold k" sums every site's rows outside fold k, and its held-out
   loss is summed over fold k. The penalty grid runs from the smallest penalty that keeps every
   coefficient at zero (from the comoments) down to ``lambda_min_ratio`` of it.

All fits of a study (every penalty x fold x training set: the federated one and one per left-out
site) advance together, one message round a step: :class:`FitBatch` holds their state at the
server and asks for the sites' :class:`BatchTerms` at each fit's trial coefficients. Each step is
a proximal Newton step (coordinate descent on the exact quadratic model of the summed
likelihood) with a backtracking line search across rounds: for a ridge penalty it is Newton's
method, for a Gaussian loss it converges in one step. No I/O and no Flower; every array that
leaves a site is indexed by fit or by feature, never by patient.

The modules: :mod:`.screening` (the comoments, screening and the penalty's upper end),
:mod:`.model` (:class:`LinearModel`, a fitted model as it travels), :mod:`.terms` (the sites'
half: their sums for many fits at once, and their CV folds), :mod:`.solver` (the proximal
Newton target of one fit), :mod:`.batch` (the server's half: :class:`FitBatch` and the penalty
grid) and :mod:`.pooled` (both halves in one process: :func:`fit_pooled`).
"""
