"""Aggregation behind ``clcli table DIR``: a sweep's ``results.json`` files folded into mean ± std
tables beside the papers' numbers (DESIGN principle 7: a paper table is data).

What happens, in order (each step is one module; its docstring has the details):

1. **Load** (:mod:`.load`). Every ``results.json`` under ``DIR`` (recursively). Directory names are
   never parsed: everything comes from the file. A file that is not valid JSON or lacks a required
   key stops the command with exit code 2 and names the file.
2. **Group** (:mod:`.group`). Runs whose ``run`` choices and ``config`` are identical except for the
   keys that only name the repetition or the machine (``seed``, ``device``, ``paths``, the ``paper``
   block, …) form one group: one table row, labelled by what tells it from the other groups.
3. **Summarise** (:mod:`.group`). Per group and headline metric (:mod:`.kinds`; class-incremental,
   SLCA arXiv 2303.05118, docs/metrics.md#last-acc: ``last_acc``, ``inc_acc``, ``forgetting``; MTIL,
   ZSCL's definitions used by DIKI arXiv 2407.05342, docs/metrics.md#mtil-transfer: ``transfer``,
   ``avg``, ``last``, plus a per-dataset table): mean, *sample* standard deviation (``ddof=1``) and
   ``n`` over the group's *complete* runs; runs that stopped early (``diverged``) are never averaged
   in but counted in an ``outcome`` column (``diverged 1/3``), next to runs with collapse warnings
   (``collapse 2/3``). With ``n = 1`` the std is shown as ``–`` (empty in CSV), never as a misleading 0.
4. **Compare** (:mod:`.tables`). When the group's runs carry a ``paper`` block (written from the
   experiment file's ``paper:`` key), the paper value and ``Δ = ours − paper`` stand beside each
   metric; values listed in ``paper.unverified`` are marked ``*``; sources and notes are printed
   under the table.
5. **Output**: :mod:`.render` (rich, markdown, LaTeX, CSV), :mod:`.plot` (``--plot``) and
   :mod:`.series` (``--plot-x KEY``: each headline metric against a swept config key).

The command line itself is :mod:`clcli.table`.
"""
