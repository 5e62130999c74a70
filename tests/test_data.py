import pytest
import torch
from PIL import Image

from difflab import data


def test_shapes_are_deterministic_captioned_and_masked():
    a, b = data.Shapes(n=16, seed=3), data.Shapes(n=16, seed=3)
    for i in (0, 7, 15):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["x"], ib["x"]) and ia["caption"] == ib["caption"]
        assert ia["x"].shape == (3, 32, 32) and -1 <= float(ia["x"].min()) and float(ia["x"].max()) <= 1
        words = ia["caption"].split()
        assert words[0] == "a" and words[3] in data.shapes.SHAPES
        assert ia["mask"].sum() > 10 and 0 < ia["edges"].sum() < ia["mask"].sum()
    assert not torch.equal(data.Shapes(n=4, seed=4)[0]["x"], a[0]["x"])
    held = data.Shapes(n=64, seed=0, holdout=(("circle", "red"),))
    assert all(not (at["shape"] == "circle" and at["colour"] == "red") for at in held.attributes)
    only = data.Shapes(n=8, seed=0, holdout=(("circle", "red"),), only_holdout=True)
    assert all("red circle" in only[i]["caption"] for i in range(8))


def test_digits_splits_are_disjoint_and_scaled():
    train, test = data.Digits("train"), data.Digits("test")
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (1, 8, 8)
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    big = data.Digits("test", size=16)
    assert big.x.shape[1:] == (1, 16, 16) and torch.equal(big.labels, test.labels)


def test_image_folder_reads_classes_and_captions(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / cls / "a.png")
    (tmp_path / "dogs" / "a.txt").write_text("a red dog\n")
    ds = data.ImageFolder(tmp_path, resolution=16)
    assert len(ds) == 2 and ds.classes == ["cats", "dogs"]
    item = ds[1]
    assert item["x"].shape == (3, 16, 16) and item["label"] == 1 and item["caption"] == "a red dog"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolder(tmp_path / "empty")
    (tmp_path / "cats" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        data.ImageFolder(tmp_path)[1]  # cats/b.png


@pytest.mark.parametrize("kind", ["ring", "moons", "checkerboard", "mixture"])
def test_toy_distributions(kind):
    ds = data.Toy2D(kind, n=500, seed=1)
    assert ds.x.shape == (500, 2) and torch.isfinite(ds.x).all()
    assert torch.equal(ds.x, data.Toy2D(kind, n=500, seed=1).x)
    with pytest.raises(ValueError, match="choose one of"):
        data.build("cifar")


def test_hugging_face_datasets_from_local_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from difflab.data import build, hf_dataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    images = [Image.new("RGB", (20, 12), c) for c in colours]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": ["red", "blue", "green"], "label": [0, 1, 1]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["warm", "cool"])}))
    ds.save_to_disk(str(tmp_path / "saved"))
    data = hf_dataset(tmp_path / "saved", caption_column="text", resolution=8)
    assert len(data) == 3 and data.num_classes == 2
    item = data[1]
    assert item["x"].shape == (3, 8, 8) and item["caption"] == "blue" and item["label"] == 1
    assert item["x"][2].min() == 1.0 and item["x"][0].max() == -1.0  # pure blue in [-1, 1]
    # an imagefolder directory (class sub-folders), through the training registry
    for name, colour in (("a", (255, 255, 255)), ("b", (0, 0, 0))):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "folder" / name / "x.png")
    folder = build("hf", path=str(tmp_path / "folder"), resolution=8)
    assert len(folder) == 2 and sorted(int(folder[i]["label"]) for i in range(2)) == [0, 1]
    with pytest.raises(ValueError, match="no column"):
        hf_dataset(tmp_path / "saved", caption_column="caption")
    with pytest.raises(FileNotFoundError, match="no dataset"):
        hf_dataset(tmp_path / "missing")


def test_scenes_are_deterministic_and_their_control_maps_are_exact():
    from difflab.data.scenes import CONTROLS, edges_of
    from difflab.data.shapes import COLOURS

    a, b = data.Scenes(n=24, seed=5), data.Scenes(n=24, seed=5)
    counts = set()
    palette = torch.tensor([(20, 20, 28), *COLOURS.values()], dtype=torch.float32) / 127.5 - 1
    for i in range(24):
        x, y = a[i], b[i]
        assert torch.equal(x["x"], y["x"]) and x["caption"] == y["caption"]
        counts.add(x["count"])
        assert x["caption"].count(" a ") + 1 == x["count"] or x["count"] == 1
        # every pixel is exactly the palette colour of its class: the maps are the image's ground truth
        assert torch.equal(x["x"], palette[x["classes"]].permute(2, 0, 1))
        assert torch.equal(x["segmentation"].sum(0), (x["classes"] > 0).float())
        assert torch.equal(x["edges"][0].bool(), torch.from_numpy(edges_of(x["objects"].numpy())))
        inside = x["objects"] > 0
        assert bool((x["distance"][0][inside] > 0).all()) and bool((x["distance"][0][~inside] == 0).all())
        assert int(x["objects"].max()) <= x["count"]
    assert counts == {1, 2, 3}
    assert not torch.equal(data.Scenes(n=1, seed=6)[0]["x"], a[0]["x"])
    assert a.controls("edges", [0, 1]).shape == (2, 1, 32, 32)
    assert set(CONTROLS) == {"segmentation", "edges", "distance"}
    with pytest.raises(ValueError, match="no 'depth' control"):
        a.controls("depth")
    with pytest.raises(ValueError, match="min_objects"):
        data.Scenes(n=1, min_objects=3, max_objects=2)
