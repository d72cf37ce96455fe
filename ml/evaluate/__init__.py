"""Model-agnostic evaluation of a scored test set (``oncopacs evaluate``).

- ``scored``: the :class:`~ml.evaluate.scored.Scored` contract a model's
  ``score_<model>`` function returns (outcomes, probabilities, comparators);
- ``run``: :func:`~ml.evaluate.run.evaluate_scored` computes every figure with
  :mod:`ml.stats` and writes ``metrics.json``, the PNG figures and ``report.md``;
- ``report``: the Markdown report with its TRIPOD+AI checklist;
- ``cli``: the ``oncopacs evaluate`` command.
"""
