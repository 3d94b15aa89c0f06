"""PNG plots of a run: Optuna's matplotlib visualizations of the search and the final training curves."""
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

log = logging.getLogger(__name__)

# Optuna's plotters, each drawn for the study that holds the best trial (history: for every study)
SEARCH_PLOTS = {
    "optimization_history": optuna_plots.plot_optimization_history,
    "param_importances": optuna_plots.plot_param_importances,
    "intermediate_values": optuna_plots.plot_intermediate_values,
    "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
}
AXIS_NAMES = {"val_accuracy": "validation accuracy", "mmac": "MMAC per image", "latency_ms": "CPU ms per image"}


def _save(axes, path):
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.set_size_inches(10, 6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_plots(out_dir, studies, best_study, front_study=None, final_history=None):
    """Write what can be drawn into <out_dir>/plots/; return the paths written.

    A plot that the trials cannot support (for example importances with one complete trial) is
    skipped with a log line rather than stopping the run. `front_study`: a multi-objective run's trials in
    one study (studies.merged_study), drawn as pareto_front.png; the other plots then show accuracy.
    """
    folder = Path(out_dir) / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib on flat axes of a tiny study
        several = len(best_study.directions) > 1
        for name, plot in SEARCH_PLOTS.items():
            if several and name == "intermediate_values":
                continue  # Optuna cannot prune multi-objective trials, so they report no intermediate values
            target = studies if name == "optimization_history" and len(studies) > 1 else best_study
            # a multi-objective study has no single value: draw its first objective, validation accuracy
            accuracy = dict(target=lambda t: t.values[0], target_name="validation accuracy") if several else {}
            try:
                _save(plot(target, **accuracy), folder / f"{name}.png")
                written.append(folder / f"{name}.png")
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                log.info(f"plot {name} skipped: {error}")
    if front_study is not None and len(front_study.directions) > 1:
        path = folder / "pareto_front.png"
        try:
            names = [AXIS_NAMES.get(name, name) for name in front_study.metric_names]
            axes = optuna_plots.plot_pareto_front(front_study, target_names=names)
            if len(names) == 2 and front_study.metric_names[1] == "mmac":
                axes.set_yscale("log")  # a front spans from a tenth of a MMAC to tens of them
            _save(axes, path)
            written.append(path)
        except (ValueError, RuntimeError) as error:
            log.info(f"plot pareto_front skipped: {error}")
    if final_history:
        path = folder / "final_training.png"
        _training_curves(final_history, path)
        written.append(path)
    return written


def _training_curves(history, path):
    epochs = [h["epoch"] for h in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_axes.set(title="final training: loss", xlabel="epoch", ylabel="train loss")
    accuracy_axes.plot(epochs, [100 * h["train_accuracy"] for h in history], marker="o", label="train")
    val = [(h["epoch"], 100 * h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if val:
        accuracy_axes.plot(*zip(*val), marker="o", label="validation")
    accuracy_axes.set(title="final training: accuracy", xlabel="epoch", ylabel="accuracy (%)")
    accuracy_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
