"""Config: valid files load; every kind of bad input names the key; overrides; paths."""

from pathlib import Path

import pytest

from zturbo_train.config import Config, load_config, validate_config
from zturbo_train.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = '[model]\npath = "builtin:tiny"\n[data]\ndir = "imgs"\n'


def test_minimal_config_has_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.adapter == "v2" and cfg.model.adapter_mode == "merge"
    assert cfg.lora.rank == 32 and cfg.lora.scale_alpha == 32.0
    assert cfg.sample.steps == 8 and cfg.sample.guidance == 0.0
    assert cfg.data[0].resolution == [1024]


def test_relative_paths_resolve_against_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + '[train]\noutput_dir = "out/run1"\n'))
    assert cfg.data[0].dir == (tmp_path / "imgs").resolve()
    assert cfg.train.output_dir == (tmp_path / "out" / "run1").resolve()


def test_local_model_path_resolves_and_hub_id_stays(tmp_path):
    (tmp_path / "mymodel").mkdir()
    cfg = load_config(
        write(tmp_path, '[model]\npath = "mymodel"\nadapter = "owner/repo/file.safetensors"\n[data]\ndir = "x"\n')
    )
    assert cfg.model.path == str((tmp_path / "mymodel").resolve())
    assert cfg.model.adapter == "owner/repo/file.safetensors"
    hub = load_config(write(tmp_path, '[model]\npath = "Tongyi-MAI/Z-Image-Turbo"\n[data]\ndir = "x"\n'))
    assert hub.model.path == "Tongyi-MAI/Z-Image-Turbo"


def test_unknown_key_names_full_path_and_closest_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `train.learning_rate`; did you mean `train.lr`\?"):
        load_config(write(tmp_path, MINIMAL + "[train]\nlearning_rate = 1e-4\n"))
    with pytest.raises(ConfigError, match=r"unknown key `lora.rnk`; did you mean `lora.rank`\?"):
        load_config(write(tmp_path, MINIMAL + "[lora]\nrnk = 4\n"))
    with pytest.raises(ConfigError, match=r"unknown key `trian`; did you mean `train`\?"):
        load_config(write(tmp_path, MINIMAL + "[trian]\nsteps = 4\n"))


def test_wrong_type_and_range_name_key_value_and_rule(tmp_path):
    with pytest.raises(ConfigError, match=r"`train.steps` = 'many': input should be a valid integer"):
        load_config(write(tmp_path, MINIMAL + '[train]\nsteps = "many"\n'))
    with pytest.raises(ConfigError, match=r"`train.lr` = -0.1: input should be greater than 0"):
        load_config(write(tmp_path, MINIMAL + "[train]\nlr = -0.1\n"))
    with pytest.raises(ConfigError, match=r"`model.dtype` = 'f32': input should be 'bf16', 'fp16' or 'fp32'"):
        load_config(write(tmp_path, '[model]\ndtype = "f32"\n[data]\ndir = "x"\n'))
    with pytest.raises(ConfigError, match=r"`data.resolution` = 500: 500 is not allowed; use multiples of 16"):
        load_config(write(tmp_path, MINIMAL + "resolution = 500\n"))
    with pytest.raises(ConfigError, match=r"16 is not allowed; use multiples of 16 of at least 32"):
        load_config(write(tmp_path, MINIMAL + "resolution = 16\n"))
    assert load_config(write(tmp_path, MINIMAL + "resolution = 32\n")).data[0].resolution == [32]  # the lab's
    with pytest.raises(ConfigError, match=r"`lora.targets` = .*'to_x' is not one of"):
        load_config(write(tmp_path, MINIMAL + '[lora]\ntargets = ["to_q", "to_x"]\n'))


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + "[train]\nlr = 0\nsteps = 0\n[lora]\nrank = -1\n"))
    text = str(info.value)
    assert "`train.lr`" in text and "`train.steps`" in text and "`lora.rank`" in text


def test_missing_data_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[data\] table"):
        load_config(write(tmp_path, '[model]\npath = "builtin:tiny"\n'))
    with pytest.raises(ConfigError, match=r"`data.dir` is required"):
        load_config(write(tmp_path, "[data]\nresolution = 512\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is not valid TOML") as plain:
        load_config(write(tmp_path, "[model\n"))
    assert "[[data]]" not in str(plain.value)
    # a regularisation set added as [[data]] under a first table written [data]: TOML's own message is cryptic
    mixed = '[data]\ndir = "a"\n# a comment\n[[data]]  # the set\ndir = "b"\nregularisation = true\n'
    with pytest.raises(ConfigError, match=r"write each one as \[\[data\]\], the first too"):
        load_config(write(tmp_path, mixed))


def test_set_overrides_any_key(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "train.lr=2e-4",
            "lora.rank=8",
            "data.resolution=[512, 768]",
            "model.adapter=none",
            'sample.prompts=["a", "b"]',
        ],
    )
    assert cfg.train.lr == 2e-4 and cfg.lora.rank == 8 and cfg.data[0].resolution == [512, 768]
    assert cfg.model.adapter == "none" and cfg.sample.prompts == ["a", "b"]
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(write(tmp_path, MINIMAL), ["lr=3"])
    with pytest.raises(ConfigError, match="did you mean `train.lr`"):
        load_config(write(tmp_path, MINIMAL), ["train.learning_rate=3"])


def test_set_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    """A path typed on the command line means what it means in the shell, not next to the config."""
    (tmp_path / "configs").mkdir()
    config = write(tmp_path / "configs", MINIMAL)
    (tmp_path / "work" / "local-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config(
        config,
        [
            "data.dir=my-photos",
            "train.output_dir=out/run",
            "model.path=local-model",
            "model.adapter=v2",
            'data.dir="~/x"',
        ],
    )
    assert cfg.data[0].dir == Path("~/x").expanduser().resolve()
    assert cfg.train.output_dir == tmp_path / "work" / "out" / "run"
    assert cfg.model.path == str(tmp_path / "work" / "local-model") and cfg.model.adapter == "v2"
    cfg = load_config(config, ["data.dir=my-photos", "model.path=Tongyi-MAI/Z-Image-Turbo"])
    assert cfg.data[0].dir == tmp_path / "work" / "my-photos" and cfg.model.path == "Tongyi-MAI/Z-Image-Turbo"
    assert load_config(config).data[0].dir == tmp_path / "configs" / "imgs"  # in the file: next to it


def test_several_data_tables(tmp_path):
    text = '[model]\npath = "builtin:tiny"\n[[data]]\ndir = "a"\n[[data]]\ndir = "b"\nresolution = [512, 1024]\n'
    cfg = load_config(write(tmp_path, text), ["data.1.repeats=3"])
    assert [d.dir.name for d in cfg.data] == ["a", "b"]
    assert cfg.data[1].repeats == 3 and cfg.data[0].repeats == 1
    with pytest.raises(ConfigError, match=r"`data\[1\].repeats`"):
        load_config(write(tmp_path, text), ["data.1.repeats=0"])


def test_set_picks_one_of_several_data_tables_and_refuses_an_ambiguous_one(tmp_path):
    """`data.dir` with two [[data]] tables used to set both; now it names the index syntax instead."""
    text = '[model]\npath = "builtin:tiny"\n[[data]]\ndir = "a"\n[[data]]\ndir = "b"\n'
    with pytest.raises(
        ConfigError,
        match=r"--set 'data.dir=/x' is ambiguous: the config has 2 \[\[data\]\] "
        r"tables; pick one by index, e.g. --set data.0.dir=\.\.\.",
    ):
        load_config(write(tmp_path, text), ["data.dir=/x"])
    cfg = load_config(write(tmp_path, text), ["data[1].dir=/x", "data.0.repeats=2"])
    assert [d.dir for d in cfg.data] == [tmp_path / "a", Path("/x")] and [d.repeats for d in cfg.data] == [2, 1]
    with pytest.raises(ConfigError, match=r"has 2 \[\[data\]\] tables \(indexes 0 to 1\)"):
        load_config(write(tmp_path, text), ["data.2.dir=/x"])
    one = load_config(write(tmp_path, MINIMAL), ["data.dir=/x", "data.0.repeats=4"])  # one table: both forms work
    assert one.data[0].dir == Path("/x") and one.data[0].repeats == 4


def test_set_below_a_value_is_one_clear_error(tmp_path):
    """`--set train.lr.x=1` used to crash with an AttributeError traceback."""
    config = write(tmp_path, MINIMAL + "[train]\nlr = 1e-4\n")
    with pytest.raises(ConfigError, match=r"`train.lr` is a value, not a table; set it directly, e.g. --set train.lr="):
        load_config(config, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"`model.path` is a value, not a table"):
        load_config(config, ["model.path.deeper=1"])


def test_a_folder_given_as_config_names_its_toml_files(tmp_path):
    (tmp_path / "b.toml").write_text(MINIMAL)
    (tmp_path / "a.toml").write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r".* is a folder, not a file; pass one of its .toml files: a.toml, b.toml"):
        load_config(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is a folder, not a file; it holds no .toml files"):
        load_config(tmp_path / "empty")


def test_model_dump_round_trips():
    cfg = validate_config({"data": {"dir": "/tmp/x"}})
    again = Config.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.data, path
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), "each example config starts with a comment giving the commands to run it"


def test_optimizer_keys_default_and_refuse_what_cannot_work(tmp_path):
    """Prodigy's lr defaults to 1 (a multiplier of its own step size); combinations that cannot work are one line."""

    def train(**keys) -> Config:
        return validate_config({"data": {"dir": "imgs"}, "train": keys}, base_dir=tmp_path)

    assert train(optimizer="prodigy").train.lr == 1.0 and train().train.lr == 1e-4
    assert train(optimizer="prodigy", lr=0.5).train.lr == 0.5
    assert train(optimizer="adamw", loraplus_ratio=16).train.loraplus_ratio == 16
    refused = [
        (
            {"optimizer": "prodigy", "lr": 1e-4},
            "invalid config: `train.lr` = 0.0001 with optimizer prodigy: Prodigy estimates the step size itself",
        ),
        ({"optimizer": "prodigy", "loraplus_ratio": 16}, "`train.loraplus_ratio` needs one lr per parameter group"),
        (
            {"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"},
            '`train.lr_scheduler` = "cosine" with optimizer adamw_schedulefree',
        ),
        ({"loraplus_ratio": 0.5}, "`train.loraplus_ratio` = 0.5: input should be greater than or equal to 1"),
        ({"optimizer_args": {"weight_decay": 0.1}}, "`train.optimizer_args` sets weight_decay; remove it"),
        ({"loraplus_lr_ratio": 4}, "unknown key `train.loraplus_lr_ratio`; did you mean `train.loraplus_ratio`?"),
        ({"optimizer": "sgd"}, "'adamw', 'adamw8bit', 'prodigy', 'adafactor', 'lion' or 'adamw_schedulefree'"),
        ({"optimizer": "adamw_schedulefree", "ema": True}, "`train.ema` = true with optimizer adamw_schedulefree"),
        ({"ema_decay": 1.0}, "`train.ema_decay` = 1.0: input should be less than 1"),
        ({"use_ema": True}, "did you mean `train.ema`?"),
    ]
    for keys, message in refused:
        with pytest.raises(ConfigError) as err:
            train(**keys)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_validation_keys_resolve_and_refuse_bad_values(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + '[train]\nval_dir = "held"\nval_every = 5\n'))
    assert cfg.train.val_dir == tmp_path / "held" and cfg.val_data.dir == tmp_path / "held"
    assert cfg.val_data.repeats == 1 and cfg.val_data.caption_dropout == 0.0
    assert load_config(write(tmp_path, MINIMAL)).val_data is None
    for text, message in (
        ("val_fraction = 1.0", "`train.val_fraction` = 1.0: input should be less than 1"),
        ("val_every = 0", "`train.val_every` = 0: input should be greater than or equal to 1"),
        ("validation_split = 0.1", "did you mean `train.val_fraction`?"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_config(write(tmp_path, MINIMAL + f"[train]\n{text}\n"))
