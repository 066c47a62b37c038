"""What ``stackwise train / eval / generate`` build on: the run directory, metrics, progress,
plots, summary, evaluation, generation and the configuration reference.

Modules: :mod:`~stackwise.run.rundir` (layout, locking), :mod:`~stackwise.run.resume` (which
checkpoint a resumed run continues from), :mod:`~stackwise.run.metrics` (metrics.jsonl schema),
:mod:`~stackwise.run.progress` (trainer callbacks), :mod:`~stackwise.run.plots`,
:mod:`~stackwise.run.summary`, :mod:`~stackwise.run.evaluate`, :mod:`~stackwise.run.likelihood`
(what bits per byte measures), :mod:`~stackwise.run.generate` (KV-cache and masked samplers),
:mod:`~stackwise.run.train`, :mod:`~stackwise.run.reference`.
Imports are lazy: ``import stackwise.run`` loads neither matplotlib nor tqdm.
"""
