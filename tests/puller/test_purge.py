"""What the purge before the first READY removes under ROOT_MODEL_DIR, and what it keeps."""

from __future__ import annotations

from pathlib import Path

from adapter.settings import Settings
from puller.pull import Puller


def test_purge_removes_model_dirs_and_staging_but_keeps_sidecar_folders_and_runtime_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    (root / "old-model" / "m").mkdir(parents=True)
    (root / "old-model" / "m" / "w.bin").write_bytes(b"x")
    (root / "linked-model").symlink_to(tmp_path)  # a link is removed, never followed
    (root / "_tmp" / "half").mkdir(parents=True)
    (root / "_cache").mkdir()
    (root / "_mlserver_models").mkdir()
    (root / "model_config_list.json").write_text("{}")  # a runtime's own config file
    puller = Puller(Settings(root_model_dir=root, storage_config_dir=tmp_path / "sc"))
    removed = puller.purge()
    assert sorted(removed) == ["linked-model", "old-model"]
    assert sorted(p.name for p in root.iterdir()) == [
        "_cache",
        "_mlserver_models",
        "_tmp",
        "model_config_list.json",
    ]
    assert list((root / "_tmp").iterdir()) == []
    assert (tmp_path / "models").exists()  # the link's target survived
