"""Dead-letter tools: ``contact-worker dlq show URI`` and ``dlq replay URI --to INPUT``.

The URI is the one ``--dlq`` takes (:func:`worker.deadletters.open_sink`); :mod:`.stores` reads
and marks each kind, :mod:`.summary` and :mod:`.plan` decide without I/O, :mod:`.replay` carries a
replay out, :mod:`.display` prints, :mod:`.cli` is the command line.
"""
