"""Experiments on Ray: everything that starts, joins or drives a Ray cluster. Import the member.

- ``experiment``: ``run_experiment``, the Tune driver (spec in, finished or resumed experiment out)
- ``trial``: what runs inside a trial (one body, in-process or on every Train worker)
- ``search``: the Tune param space and the search algorithms (random, grid, Optuna TPE, fixed samples)
- ``trial_schedulers``: Tune's trial schedulers (ASHA, FIFO) and their state across ``--resume``
- ``sizing``: how many trials fit on the cluster at once, and what each asks for
- ``cluster``: a private local Ray cluster, stopped by PID
- ``storage``: the results storage, checked before Ray starts; runs ``--resume`` can restore
- ``progress``: live progress on the terminal
- ``submit``: experiments as Ray jobs (the library half; the commands are in tuning.cli.jobs)
"""
