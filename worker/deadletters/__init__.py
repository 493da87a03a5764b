"""Dead letters, the one folder for them: the sink contract and the record it writes
(:mod:`.base`), the store contract that ``dlq`` reads and marks (:mod:`.store`), and the tools
``contact-worker dlq show URI`` and ``dlq replay URI --to INPUT``.

Each backend's sink and store live with the backend (:mod:`worker.backends`); the URI is the one
``--dlq`` takes (:func:`worker.backends.open_sink`). :mod:`.summary` and :mod:`.plan` decide
without I/O, :mod:`.replay` carries a replay out, :mod:`.targets` names where it writes,
:mod:`.display` prints, :mod:`.cli` is the command line.
"""
