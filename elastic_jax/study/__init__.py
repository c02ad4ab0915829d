"""The paper's comparisons as a study anyone can rerun (``python -m elastic_jax.study --config configs/study.py``).

On any parent and data a run config names, every seed of ``config.study.seeds`` runs the arms of
``config.study.arms`` (``arms.ARMS``): the elastic family from one run of T tokens, and against it Minitron-style
sequential compression (each smaller member pruned with the same ranking, then distilled alone from the same teacher
on T/(n-1) or on T tokens), the same architectures trained from scratch on T tokens, the elastic run with stage 2 off
and with uniform stage-2 sampling. Each arm x seed runs in its own folder and resumes like the main job
(``run``); the results are gathered from the arms' own reports into ``study.json``, ``study.md`` and plots, with
means and 95% intervals over seeds and a verdict per comparison (``summary``). See docs/study.md.
"""
