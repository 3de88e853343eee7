"""``data.name: raydata`` and its ``data.source`` section (training.sources), validated without torch
or Ray: what each format needs, errors naming the key, round trips, and the other datasets untouched."""
import subprocess
import sys

import pytest

from training.config import ConfigError, TrainConfig

PARQUET = {"train": "s3://bucket/digits/train/", "val": "s3://bucket/digits/val/", "features": ["pixels"],
           "input_shape": [1, 8, 8], "num_classes": 10}


def raydata(**source) -> dict:
    return {"data": {"name": "raydata", "source": {**PARQUET, **source}}}


def test_a_parquet_and_an_images_source_round_trip():
    cfg = TrainConfig.from_dict(raydata(mean=[4.9], std=[6.0], shuffle="local", shuffle_buffer=500))
    s = cfg.data.source
    assert (s.format, s.label, s.features, s.input_shape, s.shuffle, s.cpus_per_task) == (
        "parquet", "label", ["pixels"], [1, 8, 8], "local", 1.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["data.source.train"] == "s3://bucket/digits/train/"
    images = TrainConfig.from_dict({"data": {"name": "raydata", "image_size": 64, "source": {
        "format": "images", "train": "/shared/pets/train", "val": "file:///shared/pets/val"}}})
    assert images.data.source.num_classes is None and TrainConfig.from_dict(images.to_dict()) == images
    # a sampled dict merges into the section, as every section does
    assert cfg.with_updates({"data.source": {"shuffle": "full"}}).data.source.train == PARQUET["train"]


def test_other_datasets_are_untouched():
    assert TrainConfig().data.name == "digits" and TrainConfig().data.source.train is None
    assert TrainConfig.from_dict({"data": {"name": "mnist1d"}}).data.name == "mnist1d"


@pytest.mark.parametrize("d,key,expected", [
    ({"data": {"name": "raydata"}}, "data.source.train", "a path or URI"),
    (raydata(val=None), "data.source.val", "a path or URI"),
    (raydata(features=[]), "data.source.features", "a non-empty list of feature columns"),
    (raydata(input_shape=[]), "data.source.input_shape", "1 to 3 positive sizes"),
    (raydata(input_shape=[1, 0, 8]), "data.source.input_shape", "1 to 3 positive sizes"),
    (raydata(num_classes=None), "data.source.num_classes", "an integer >= 2"),
    (raydata(num_classes=1), "data.source.num_classes", "an integer >= 2"),
    (raydata(mean=[0.5]), "data.source.mean", "together with std"),
    (raydata(mean=[0.5, 0.5], std=[1.0, 1.0]), "data.source.mean", "1 or 1 values (one per channel"),
    (raydata(mean=[0.5], std=[0.0]), "data.source.std", "values > 0"),
    (raydata(shuffle="global"), "data.source.shuffle", "one of 'full', 'local'"),
    (raydata(shuffle_buffer=0), "data.source.shuffle_buffer", ">= 1"),
    (raydata(cpus_per_task=0), "data.source.cpus_per_task", "> 0"),
    (raydata(format="csv"), "data.source.format", "one of 'parquet', 'images'"),
    (raydata(path="s3://x"), "data.source.path", "one of the keys"),
    ({"data": {"name": "raydata", "source": {"format": "images", "train": "a", "val": "b", "num_classes": 3}}},
     "data.source.num_classes", "unset for format: images"),
    ({"data": {"name": "raydata", "source": {"format": "images", "train": "a", "val": "b", "features": ["px"]}}},
     "data.source.features", "unset for format: images"),
    ({"data": {"name": "raydata", "root": "/data", "source": PARQUET}}, "data.root", "unset with data.name: raydata"),
    ({"data": {"name": "raydata", "num_samples": 100, "source": PARQUET}}, "data.num_samples", "null with data.name"),
    ({"data": {"name": "digits", "source": {"train": "a"}}}, "data.source", "unset unless data.name is 'raydata'"),
    ({"data": {"name": "raydat"}}, "data.name", "did you mean 'raydata'"),
])
def test_errors_name_the_key(d, key, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    assert e.value.key == key and expected in e.value.expected, str(e.value)


def test_validating_a_source_imports_neither_torch_nor_ray():
    code = ("import sys; from training.config import TrainConfig; "
            f"TrainConfig.from_dict({raydata()!r}); "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
