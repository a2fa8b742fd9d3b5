"""Harmonization: ComBat split into site and server halves (:mod:`.combat`)."""
