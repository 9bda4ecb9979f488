"""vagrant/Vagrantfile: it cannot boot here (no hypervisor, no box downloads), so it is
validated by Vagrant itself, and checked to provision through the one shared set-up script."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import kernel_skip

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
TEXT = (VAGRANT_DIR / "Vagrantfile").read_text()


def _validate(directory: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`vagrant validate`, its state (HOME's .vagrant.d, the project's .vagrant) kept in
    `home`, out of the repository."""
    if shutil.which("vagrant") is None:
        kernel_skip("vagrant is not installed (scripts/setup.sh --vm installs it)")
    return subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=directory,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                               "VAGRANT_DOTFILE_PATH": str(home / ".vagrant")})


def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    before = sorted(p.name for p in VAGRANT_DIR.iterdir())
    out = _validate(VAGRANT_DIR, tmp_path)
    assert sorted(p.name for p in VAGRANT_DIR.iterdir()) == before  # no state left in the tree
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully" in out.stdout


def test_a_broken_vagrantfile_fails_validation(tmp_path: Path) -> None:
    (tmp_path / "Vagrantfile").write_text(TEXT.replace('BOX_VERSION = "', 'BOX_VERSION = ("'))
    assert _validate(tmp_path, tmp_path).returncode != 0


def test_boxes_are_current_and_pinned() -> None:
    boxes = dict(re.findall(r'"(\w+)"\s*=>\s*"(bento/[\w.-]+)"', TEXT))
    assert set(boxes.values()) == {"bento/ubuntu-22.04", "bento/ubuntu-24.04", "bento/debian-12"}
    assert re.search(r'BOX_VERSION = "\d{6}\.\d+\.\d+"', TEXT)
    assert "node.vm.box_version = BOX_VERSION" in TEXT


def test_provisioning_is_the_shared_setup_script() -> None:
    assert 'inline: "cd /vagrant && scripts/setup.sh --dev"' in TEXT
    assert 'config.vm.synced_folder "..", "/vagrant"' in TEXT
    # No second copy of the install steps.
    assert "apt-get" not in TEXT and "pip install" not in TEXT
    assert (VAGRANT_DIR.parent / "scripts" / "setup.sh").is_file()


@pytest.mark.parametrize("name", ["ubuntu2204", "ubuntu2404", "debian12"])
def test_machines_are_defined(name: str) -> None:
    assert re.search(rf'"{name}"\s*=>', TEXT)


def test_readme_documents_the_one_liner_and_what_was_run() -> None:
    readme = (VAGRANT_DIR.parent / "README.md").read_text()
    assert "vagrant up ubuntu2404 && vagrant ssh ubuntu2404 -c 'cd /vagrant && make test'" in readme
    assert "never booted" in readme  # says plainly what was not run
