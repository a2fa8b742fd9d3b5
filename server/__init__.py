"""The coordinator: the Flower ServerApp (``server/app.py``) and the study logic it calls."""
