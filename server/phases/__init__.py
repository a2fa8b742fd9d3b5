"""The coordinator's half of each phase of the study, one module per phase (the site's half is
the module of the same name in ``client/phases``). Each phase runs its rounds through
:mod:`server.rounds`, writes its JSON into the study folder and returns what the next phase
needs; :mod:`server.orchestrator` runs them in order."""
