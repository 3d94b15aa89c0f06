"""The house a newcomer opens: a small top level, the machinery in one package, and imports that only go down.

Every import of the project's own modules (at the top of a file or inside a function) is read from the source
with ast and must go to a module on a lower floor; a cycle then cannot exist either."""
import ast

from conftest import ROOT

SCRIPTS = ("MNIST-optuna", "MNIST-optuna-adv")
# lowest first; the package's docstring draws the same floors
FLOORS = [
    ["errors"],
    ["models", "data"],
    ["mnist_optuna.rundir", "mnist_optuna.cli", "mnist_optuna.scores", "mnist_optuna.devices", "mnist_optuna.outcome"],
    ["mnist_optuna.settings", "mnist_optuna.launch"],
    ["mnist_optuna.checkpoints"],
    ["mnist_optuna.training"],
    ["mnist_optuna.workers", "mnist_optuna.tracking"],
    ["mnist_optuna.reporting", "mnist_optuna.plots", "mnist_optuna.backbone", "mnist_optuna.samplers"],
    ["mnist_optuna.twins"],
    ["mnist_optuna.storages"],
    ["mnist_optuna.studies"],
    ["mnist_optuna.promotion", "mnist_optuna.evaluation"],
    ["mnist_optuna.final"],
    [*SCRIPTS, "mnist_optuna.__main__"],
]
FLOOR = {module: level for level, modules in enumerate(FLOORS) for module in modules}


def project_modules():
    """{module name: path} of the top-level files and the package's modules (its __init__ imports nothing)."""
    found = {path.stem: path for path in ROOT.glob("*.py")}
    found.update({f"mnist_optuna.{path.stem}": path for path in (ROOT / "mnist_optuna").glob("*.py")
                  if path.stem != "__init__"})
    return found


def own_imports(path):
    """The project modules that a file imports anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "mnist_optuna":  # from mnist_optuna import training
                names.update(f"mnist_optuna.{alias.name}" for alias in node.names)
    return {name for name in names if name in FLOOR}


def test_the_top_level_holds_the_scripts_models_data_and_one_shared_module():
    top = sorted(path.stem for path in ROOT.glob("*.py"))
    assert top == sorted([*SCRIPTS, "models", "data", "errors"])


def test_every_module_has_a_floor_and_imports_only_from_lower_floors():
    modules = project_modules()
    assert set(modules) == set(FLOOR), "a module without a floor (or a floor without a module): place it in FLOORS"
    upward = [f"{name} (floor {FLOOR[name]}) imports {target} (floor {FLOOR[target]})"
              for name, path in modules.items() for target in sorted(own_imports(path))
              if FLOOR[target] >= FLOOR[name]]
    assert not upward, "\n".join(upward)


def test_the_floor_check_sees_an_import_inside_a_function(tmp_path):
    # the check must not miss a lazy import, the way the old reporting -> tracking cycle was written
    path = tmp_path / "lazy.py"
    path.write_text("def read():\n    from mnist_optuna.final import finish\n    from mnist_optuna import studies\n")
    assert own_imports(path) == {"mnist_optuna.final", "mnist_optuna.studies"}


MOST_LINES = 400
MOST_PARAMETERS = 6
# functions that take more, and why: the training loop's and the retrain's knobs are each a real choice of their
# callers (a trial, a promotion, a final retrain, a benchmark); a trial's life takes what the objective drew and the
# search's own three knobs; open_study takes Optuna's create_study arguments and the settings check's three. A record
# of any of these would only move the list into its constructor.
MORE_PARAMETERS = {"mnist_optuna.training.train", "mnist_optuna.training.retrain_and_test",
                   "mnist_optuna.studies.run_trial", "mnist_optuna.storages.open_study"}


def test_no_module_of_the_package_is_over_its_bound_of_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()
            if name.startswith("mnist_optuna.")}
    assert not {name: lines for name, lines in long.items() if lines > MOST_LINES}


def test_no_function_takes_more_than_six_parameters_but_the_ones_named_with_their_reason():
    many = set()
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)
                if count > MOST_PARAMETERS:
                    many.add(f"{name}.{node.name}")
    assert many == MORE_PARAMETERS
