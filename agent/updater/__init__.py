"""The device side of OTA updates.

    targets.py    safe target paths, the signed custom fields (shared with the server)
    verify.py     both TUF repositories must agree (python-tuf ngclient)
    config.py     the ``updates`` config section
    machine.py    the persisted state machine and its transition table
    fetch.py      the HTTP client: resumable, rate-capped downloads, TUF's fetcher
    store.py      the content-addressed artifact store
    install.py    validate on the device, hot swap, probation, rollback
    probation.py  the new model's health against the old one's
    installed.py  which file the agent loads at start-up
    updater.py    the service: triggers, the steps, ``attach_updater``

Nothing is imported here: the fleet server imports :mod:`agent.updater.targets` without
the agent's runtimes.
"""
