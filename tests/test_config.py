"""Bad model configs fail early, naming the bad value."""

import pytest

from model import ModelConfig, PrismerCaption
from model.config import SIZES_FILE, model_sizes


def test_size_configs_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SIZES_FILE.exists()
    assert {"prismer_base", "prismerz_base", "prismer_large", "prismerz_large", "prismer_huge"} <= set(model_sizes())


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"prismer_model": "prismer_medium"}, "unknown model size 'prismer_medium'"),
        ({"prismer_model": "prismer_base", "experts": ["depth", "sonar"]}, "unknown expert 'sonar'"),
        ({"prismer_model": "prismer_base", "image_resolution": 8}, "8 is not an integer of at least the patch size 16"),
        ({"prismer_model": "prismer_large", "image_resolution": 480.0}, "480.0 is not an integer"),
        ({"prismer_model": "prismer_large", "image_resolution": 224, "freeze": "freeze_all"}, "unknown freeze mode"),
        (
            {"prismer_model": {"vision": {"width": 64, "layers": 1, "patch_size": 16, "depth": 3}, "roberta": {}}},
            r"unknown vision key\(s\) \['depth'\]",
        ),
    ],
)
def test_bad_values_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(cfg)


def test_unknown_key_is_named_in_strict_mode():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['prismer_modle'\]"):
        ModelConfig.from_dict({"prismer_model": "prismer_base", "prismer_modle": "x"})


def test_official_prismerz_expert_list_means_rgb_only():
    assert ModelConfig.from_dict({"prismer_model": "prismerz_base", "experts": ["none"]}).experts == []


def test_model_takes_a_whole_training_config(tokenizer):
    from tests.conftest import tiny_size

    cfg = {
        "prismer_model": tiny_size(len(tokenizer)),
        "experts": ["none"],
        "image_resolution": 64,
        "pretrained": False,
        "dataset": "coco",
        "batch_size_train": 4,
        "init_lr": 5e-5,
    }
    model = PrismerCaption(cfg, tokenizer=tokenizer)
    assert model.config.image_resolution == 64 and not hasattr(model.expert_encoder, "resampler")


def test_data_keys_have_one_default_shared_by_the_run_and_the_datasets(tmp_path):
    """A dataset built from a plain mapping and one built by a training run read
    the same defaults (the datasets once defaulted seed to 0, the run to 42)."""
    from dataset import DataConfig, create_dataset
    from helpers.config import load_config
    from tests.dataset_builders import coco_world

    world = coco_world(tmp_path, n=2, experts=["depth"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data_path: {world['data_path']}\nlabel_path: {world['label_path']}\nexperts: [depth]\n")
    run = load_config(recipe)
    plain = DataConfig.from_dict(
        {
            "data_path": world["data_path"],
            "label_path": world["label_path"],
            "experts": ["depth"],
            "image_resolution": 224,
        }
    )
    assert plain == DataConfig.from_dict({k: getattr(run, k) for k in plain.__dataclass_fields__})
    from_run, from_plain = create_dataset("caption", run)[0], create_dataset("caption", plain)[0]
    assert from_run.seed == from_plain.seed == 42
    assert from_run.reader.transform.label_resolution == from_plain.reader.transform.label_resolution == 224


@pytest.mark.parametrize(
    "values,match",
    [
        ({"image_resolution": 64, "experts": [], "label_pth": "x"}, r"unknown config key\(s\) \['label_pth'\]"),
        ({"experts": []}, r"lacks key\(s\) \['image_resolution'\]"),
        ({"image_resolution": 64, "experts": [], "label_resolution": "224"}, "'label_resolution' must be"),
        ({"image_resolution": 64, "experts": ["sonar"]}, "unknown expert 'sonar'"),
    ],
)
def test_a_bad_data_key_is_named(values, match):
    from dataset import ConfigError, create_dataset

    with pytest.raises(ConfigError, match=match):
        create_dataset("caption", values)
