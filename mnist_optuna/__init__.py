"""The machinery behind MNIST-optuna.py and MNIST-optuna-adv.py. Each module has one job, and a module imports
only modules on the floors below its own (tests/test_layout.py checks it):

    final        the final stage: promotion, the retrain of the chosen network, seeds, ensembles, --evaluate
    studies      the run (device, data, folder, storage, tracker), one trial's life, the loop, the ranking
    backbone     --backbone read from a best_params.json or model.pt, local or in the artifact store
    samplers     a sampler whose draws depend on the study seed and the trial's position, not on the process
    storages     journal files, databases and the gRPC proxy; studies that remember their settings
    reporting    what a run prints and the tables it writes; plots: the PNG files
    tracking     MLflow runs and Optuna's artifact store
    workers      what workers sharing a study agree on: trial reasons, counting, lost trials, the final-stage claim
    training     the one train/evaluate loop, precision, seeds, checkpoints, ONNX
    rundir, cli  the run folder (config.json, atomic writes, source version); flags, logging, signals, exit codes
    scores       what a validation score can tell apart: standard errors, NLL, per-image correctness, McNemar's test

Below them, at the top level: models.py and data.py, and errors.py under both.
"""
