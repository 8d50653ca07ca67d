"""Model files: spec + shapes + state dict, loaded with weights_only=True, pruned models included."""

from __future__ import annotations

import pytest
import torch

from conftest import leftovers
from kdprune.checkpoint import load_model, save_model
from kdprune.errors import KdpruneError
from kdprune.models import MODEL_BUILDERS, build
from kdprune.pruning import count_macs_params, prune_to_target


def _model(arch="resnet", channels=1, size=8, classes=3):
    torch.manual_seed(0)
    spec = {"arch": arch, "width": 8, "depth": 1, "dropout": 0.0}
    model = build(spec, channels, size, classes).train()
    with torch.no_grad():
        model(torch.randn(8, channels, size, size))
    return model.eval(), spec


def test_round_trip(tmp_path):
    model, spec = _model(channels=3)
    path = tmp_path / "models" / "m.pt"
    save_model(path, model, spec, (3, 8, 8), ["a", "b", "c"], extra={"val_accuracy": 0.5})
    loaded, payload = load_model(path)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert payload["classes"] == ["a", "b", "c"]
    assert payload["spec"] == spec and list(payload["input_shape"]) == [3, 8, 8]
    assert payload["extra"] == {"val_accuracy": 0.5}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
def test_pruned_model_reloads_with_weights_only(tmp_path, arch):
    model, spec = _model(arch)
    example = torch.zeros(1, 1, 8, 8)
    model = prune_to_target(model, example, 0.5)
    path = tmp_path / "pruned.pt"
    save_model(path, model, spec, (1, 8, 8), ["a", "b", "c"])
    payload = torch.load(path, weights_only=True)  # no pickled code in the file
    assert payload["spec"] == spec
    loaded, _ = load_model(path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    # the same pruned layer shapes (and so the same parameter count), not the unpruned spec's
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert count_macs_params(loaded, example)[1] == count_macs_params(model, example)[1]


def test_missing_model_file(tmp_path):
    with pytest.raises(KdpruneError, match="not found") as info:
        load_model(tmp_path / "teacher.pt")
    assert "teacher.pt" in str(info.value)


def test_foreign_file_is_refused(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(KdpruneError, match="not a kdprune model file") as info:
        load_model(junk)
    assert str(junk) in str(info.value)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, spec = _model()
    path = tmp_path / "m.pt"

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_model(path, model, spec, (1, 8, 8), ["a", "b", "c"])
    assert not path.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("payload", [
    {"weights": torch.zeros(3)},  # a torch file of something else
    {"spec": {"arch": "resnet"}, "input_shape": [1, 8, 8], "classes": ["a"], "state_dict": {"x": torch.zeros(1)}},
    [1, 2, 3],
])
def test_torch_file_that_is_not_a_model_is_refused(tmp_path, payload):
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    with pytest.raises(KdpruneError, match="not a kdprune model file") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess

    from kdprune.io import write_text

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    orphan = tmp_path / f".out.json.tmp-{dead.pid}"
    orphan.write_text("half")
    write_text(tmp_path / "out.json", "{}")
    assert not orphan.exists() and (tmp_path / "out.json").read_text() == "{}"


def test_a_failed_write_names_the_output_it_was_for(tmp_path):
    import errno

    from kdprune.io import atomic_path

    with pytest.raises(OSError) as info:
        with atomic_path(tmp_path / "out.json"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() on a full disk: no file named
    assert info.value.filename == str(tmp_path / "out.json") and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
