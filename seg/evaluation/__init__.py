"""`seg evaluate`: score a model or existing masks against ground truth; report and plots.

Modules, one concern each:

- ``pairing``  -- predictions in ``--pred_dir`` matched to truths in ``--gt_dir`` by stem.
- ``sources``  -- what is evaluated: mask pairs, or (image, truth) samples for a model read
  from a prepared folder, a shard pattern or a raw ``images/`` + ``masks/`` folder.
- ``scoring``  -- per-image confusion counts (and the threshold sweep), the split of the
  images over ranks and the gather of their counts to rank 0.
- ``report``   -- ``evaluation_report.json`` / ``.txt``.
- ``plots`` and ``panels`` -- the metric charts and the image panels.
- ``run``      -- the two modes put together; ``seg/evaluate.py`` is the thin entry point.
"""
