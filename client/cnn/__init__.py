"""The site's half of the federated 3D CNN (phase 5): crops, local training and evaluation.

Pure torch and MONAI, independent of Flower: ``client/app.py`` unpacks the global weights, calls
:func:`client.cnn.train.train_round` or :func:`client.cnn.evaluate.evaluate_arrays` and packs
the reply (new weights and the number of training crops, or metrics). Crops, labels and
per-patient predictions never leave this package's results: a reply carries weights, counts and
metrics over at least :data:`common.payloads.MIN_ROWS_SENT` patients.

Modules
    :mod:`~client.cnn.crops` (what the network sees, cached at the site),
    :mod:`~client.cnn.device` (the torch device and threads), :mod:`~client.cnn.train` (one
    round of local training), :mod:`~client.cnn.evaluate` (metrics of global weights) and
    :mod:`~client.cnn.gradcam` (the site's own view for its report). The network itself and its
    weights as arrays are in :mod:`common.network`: the server builds it too.
"""
