"""``myelofed``, the command line: the only layer that imports every other.

One module per role, as Flower keeps ``flwr/cli``: :mod:`cli.site` (a hospital's commands),
:mod:`cli.coordinator` (the study coordinator's), :mod:`cli.protocol` (study protocols),
:mod:`cli.tools` (the synthetic cohort, offline ComBat, the app hash, the IBSI check) and
:mod:`cli.demo`; :mod:`cli.main` puts them together. Beside them: :mod:`cli.console` (the
consoles and the help rendering), :mod:`cli.exit_codes`, :mod:`cli.supervise` (the processes a
command starts or becomes) and :mod:`cli.simulation` (a study in Flower's simulation engine).

Imports: a module here imports at module level what is light (the standard library, typer,
rich, the command builders, the error types). The domain modules (pydantic models, NumPy,
pandas, SimpleITK, torch, flwr, matplotlib) are imported inside the command that needs them,
each marked ``# deferred``: importing them all takes 10 s and more, and every ``myelofed ...
--help`` would pay it (with them deferred it starts in about 0.3 s).
"""
