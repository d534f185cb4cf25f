"""The application built on the library: `dsd-kernels train` (DSD against its fair baselines:
config.py, data.py, models.py, run.py, train.py, report.py), `dsd-kernels bench` (bench/) and the
command line (cli.py). The library (ops, optim, nn, dsd, integrations) never imports it."""
