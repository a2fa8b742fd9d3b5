"""A site's half of each phase of the study, one module per phase, independent of Flower:
``client/app.py`` unpacks a message, calls one function here and packs the reply."""
