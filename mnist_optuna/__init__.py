"""The machinery behind MNIST-optuna.py and MNIST-optuna-adv.py. Each module has one job, and a module imports
only modules on the floors below its own (tests/test_layout.py checks it); the highest first:

    final        the final stage: the retrain of the chosen network, the test read once, seeds, ensembles, ONNX
    promotion    the choice at the final fidelity, on validation, by a stated rule when candidates are within noise
    evaluation   --evaluate of saved checkpoints on the test set
    studies      the run (device, data, folder, storage, tracker), one trial's life, the loop, the ranking
    storages     journal files, databases and the gRPC proxy; a study opened, made or resumed
    twins        a trial whose network another trial trains or trained is not trained again
    reporting    what a run prints and the tables it writes; plots: the PNG files
    backbone     --backbone read from a best_params.json or model.pt, local or in the artifact store
    samplers     a sampler whose draws depend on the study seed and the trial's position, not on the process
    workers      what workers sharing a study agree on: trial reasons, counting, lost trials, the final-stage claim
    tracking     MLflow runs and Optuna's artifact store
    training     the one train/evaluate loop: recipe, bf16 autocast, moving average, TTA, seeds, a retrain to its file
    checkpoints  a trained network's files: its checkpoint, the epoch checkpoint it resumes from, its ONNX export
    settings     a study's identity: the settings that define its trials, recorded and compared at each start
    launch       N workers of a script on one machine: one per GPU or a share of the cores each, restarts, Ctrl-C
    rundir, cli  the run folder (config.json, atomic writes, source version); flags, logging, signals, exit codes
    scores       what a validation score can tell apart: standard errors, NLL, per-image correctness, McNemar's test
    devices      where the arithmetic runs: the device, deterministic kernels, bf16 where it is native
    outcome      a run's search as its ending takes it: its studies, budgets, objectives, whether it was stopped

Below them, at the top level: models.py and data.py, and errors.py under both.
"""
