"""The HTML report of a cohort (``seg report``, ``seg predict --summarize``, ``seg evaluate``).

``build`` assembles the page, ``cohort`` reads a prediction folder, ``thumbs`` reads the few
images shown, ``svg``/``page`` draw charts and HTML, ``hooks`` are the commands' entry points.
"""
