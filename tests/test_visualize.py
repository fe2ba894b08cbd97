"""The visualiser draws a trained checkpoint's filters and feature maps."""

import pytest

pytest.importorskip("matplotlib", reason="the visualiser draws with matplotlib")
pytest.importorskip("torchvision", reason="the visualiser reads MNIST with torchvision's readers")

from cnn_ext import train, visualize  # noqa: E402


@pytest.mark.parametrize("model, convs", [
    ("seed", ["c1", "c2"]),
    ("deep", ["features_0", "features_3", "features_7", "features_10", "features_14"]),
])
def test_visualizer_writes_images(tmp_path, mnist_dir, model, convs):
    checkpoint = str(tmp_path / "run.pt")
    train.main(["--data-dir", mnist_dir, "--backend", "torch", "--model", model, "--train-limit", "256",
                "--test-limit", "100", "--checkpoint", checkpoint])
    out = tmp_path / "pictures"
    paths = visualize.main(["--checkpoint", checkpoint, "--out", str(out), "--backend", "torch", "--digits", "3",
                            "--data-dir", mnist_dir])
    expected = {"filters.png"} | {f"feature_maps_{name}.png" for name in convs}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(paths) == sorted(str(out / name) for name in expected)
    for path in out.iterdir():
        content = path.read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000, path.name


def test_visualizer_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        visualize.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
    assert error.value.code == 2
    assert "does not exist" in capsys.readouterr().err.strip().splitlines()[-1]
