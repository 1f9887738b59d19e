import json

import pytest
import torch

import attnlab
from attnlab import ModelConfig, build_model
from attnlab.checkpoint import atomic_write_dir


def test_save_load_round_trip(tmp_path):
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=1, tie_embeddings=False))
    model.save_pretrained(tmp_path / "m")
    again = attnlab.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_bf16_storage_is_widened_on_load(tmp_path):
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    model.save_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert attnlab.from_pretrained(tmp_path / "m").dtype == torch.float32
    assert attnlab.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_missing_and_garbled_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        attnlab.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        attnlab.from_pretrained(tmp_path / "empty")
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="damaged"):
        attnlab.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"_attnlab_format": 1, "d_model": 32, "n_heads": 4, "n_kv_heads": 3}')
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        attnlab.from_pretrained(tmp_path / "m")


def test_config_weights_mismatch_names_tensor(tmp_path):
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_kv_heads"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="k_proj.weight' has shape"):
        attnlab.from_pretrained(tmp_path / "m")


def test_failed_write_leaves_previous_directory(tmp_path):
    model = build_model(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_dir(tmp_path / "m", crash)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert attnlab.from_pretrained(tmp_path / "m") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_atomic_file_write_uses_a_private_temporary_name_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    """The one file writer every module uses: ``write`` fills a hidden temporary file beside the target (a
    unique name per call, with the ``suffix`` a writer insists on), the rename replaces the target, a failure
    leaves the target and no temporary file; the result is as readable as the umask allows."""
    import os

    from attnlab.atomic import atomic_write_file

    target = tmp_path / "graph.pt2"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".graph.pt2.tmp-") and tmp.suffix == ".pt2"
        tmp.write_bytes(b"package %d" % len(seen))

    atomic_write_file(target, write, suffix=".pt2")
    atomic_write_file(target, write, suffix=".pt2")
    assert target.read_bytes() == b"package 2" and seen[0] != seen[1]

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(target, fails)
    assert target.read_bytes() == b"package 2" and [p.name for p in tmp_path.iterdir()] == ["graph.pt2"]
    modes = {}
    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o077):
            os.umask(mask)
            modes[mask] = atomic_write_file(tmp_path / "m.json", lambda tmp: tmp.write_text("{}")).stat().st_mode
    finally:
        os.umask(old)
    assert {mask: mode & 0o777 for mask, mode in modes.items()} == {0o022: 0o644, 0o077: 0o600}
