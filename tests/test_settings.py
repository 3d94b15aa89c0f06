"""Which settings are flags and which define a study: each script declares them in blocks beside its constants."""
import json
import shutil

import optuna
import pytest

from conftest import ROOT, load_script
from data import CANONICAL_FINGERPRINT
from errors import UserError
from mnist_optuna import storages
from mnist_optuna.settings import search_settings


def script_copy(tmp_path, name, after, line, tail=""):
    """The script `name`, copied with `line` added after the line that starts with `after` (and `tail` at its
    end), loaded as a module."""
    import importlib.util

    text = (ROOT / name).read_text()
    anchor = next(row for row in text.splitlines() if row.startswith(after))
    assert text.count(anchor) == 1
    path = tmp_path / name
    path.write_text(text.replace(anchor, f"{anchor}\n{line}") + tail)
    spec = importlib.util.spec_from_file_location("copied_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, block", [("MNIST-optuna.py", "# ---- data of the trials"),
                                         ("MNIST-optuna-adv.py", "# ---- training (optimization")])
def test_a_constant_added_to_the_search_block_defines_the_study_with_no_other_edit(tmp_path, name, block):
    script = script_copy(tmp_path, name, block, "NEW_KNOB = 7                  # a setting added by the test")

    def settings(*flags):
        args = script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK)
        return search_settings(args, network=None, training_data="x")

    assert settings()["new_knob"] == 7
    storage = optuna.storages.InMemoryStorage()
    study = storages.open_study("s", storage, None, None, settings())
    assert study.user_attrs["search"]["new_knob"] == 7
    with pytest.raises(UserError, match="--new-knob 7, this run asks for 8"):
        storages.open_study("s", storage, None, None, settings("--new-knob", "8"))


@pytest.mark.parametrize("name", ["MNIST-optuna.py", "MNIST-optuna-adv.py"])
def test_a_run_constant_is_a_flag_outside_the_identity_and_a_constant_past_the_blocks_is_no_flag(tmp_path, name):
    script = script_copy(tmp_path, name, "# ---- where and how it runs", "RUN_KNOB = 3  # a run setting",
                         tail="\nTABLE_OF_THINGS = 1  # past the blocks\n")
    parser = script.build_parser()
    args = parser.parse_with_preset(["--run-knob", "4"], "--quick", script.QUICK)
    assert args.run_knob == 4 and "run_knob" not in search_settings(args)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--table-of-things", "1"])
    assert exited.value.code == 2
    assert "table_of_things" not in vars(args) and "quick" not in args.search_keys
    if name == "MNIST-optuna-adv.py":
        assert "renamed" not in vars(args)  # the table of renamed settings is no flag


def committed_studies():
    found = []
    for journal in sorted(ROOT.glob("results/*/study.journal")):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        found += [(journal, summary.study_name) for summary in optuna.get_all_study_summaries(storage)]
    return found


@pytest.mark.parametrize("journal, study_name", committed_studies(), ids=lambda value: str(value).split("results/")[-1])
def test_the_committed_studies_resume_with_their_own_settings_and_refuse_a_changed_one(tmp_path, journal, study_name):
    copy = tmp_path / "study.journal"
    shutil.copyfile(journal, copy)
    config = json.loads((journal.parent / "config.json").read_text())
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_args([])
    for key, value in config.items():
        if key in vars(args):
            setattr(args, key, tuple(value) if isinstance(getattr(args, key), tuple) else value)
    network = json.loads((ROOT / config["backbone"]).read_text())["model"] if config.get("stage") == "optim" else None

    def open_it(**changed):
        for key, value in changed.items():
            setattr(args, key, value)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(copy)))
        search = search_settings(args, network=network, training_data=CANONICAL_FINGERPRINT)
        return storages.open_study(study_name, storage, None, None, search, objectives=args.objectives)

    open_it()  # resumes
    if network is None:  # a stage-2 study from before settings were recorded can tell none from its trials
        with pytest.raises(UserError, match="--lr"):
            open_it(lr=args.lr * 2)


def test_the_grid_study_refuses_a_rerun_with_another_grid_grid_seed_or_head():
    script = load_script("MNIST-optuna-adv.py")

    def settings(*flags):
        args = script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK)
        return search_settings(args, backbone=[], training_data="x")

    storage = optuna.storages.InMemoryStorage()
    storages.open_study("grid", storage, None, None, settings())
    for flags in (["--fc-depths", "1"], ["--fc-widths", "32,64", "16"], ["--seed", "1"], ["--head-dropout", "0.3"],
                  ["--conv-blocks", '[{"channels": 8, "kernel": 3, "pool": true}]']):
        with pytest.raises(UserError, match=flags[0]):
            storages.open_study("grid", storage, None, None, settings(*flags))
    storages.open_study("grid", storage, None, None, settings("--final-epochs", "3", "--ensemble", "2"))
