import os
import shutil
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one worker per core: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("POLYPSAM_TEST_DATA", REPO.parent / "shared" / "data" / "polyp"))


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_DATA / "TrainDataset").is_dir():
        pytest.skip(f"real development data not found at {REAL_DATA} (set POLYPSAM_TEST_DATA)")
    return REAL_DATA


def _copy_pairs(src: Path, dst: Path, n: int, offset: int = 0) -> None:
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    images = sorted((src / "images").iterdir())[offset:offset + n]
    for img in images:
        mask = next((src / "masks").glob(img.stem + ".*"))
        shutil.copy(img, dst / "images" / img.name)
        shutil.copy(mask, dst / "masks" / mask.name)


@pytest.fixture
def small_root(real_root, tmp_path) -> Path:
    """A PraNet-layout tree of a few real images (Kvasir and ClinicDB sizes), in tmp."""
    root = tmp_path / "pranet"
    _copy_pairs(real_root / "TrainDataset", root / "TrainDataset", 10)
    _copy_pairs(real_root / "TrainDataset", root / "TrainDataset", 4, offset=1000)  # numbered ClinicDB stems sort first, Kvasir later
    _copy_pairs(real_root / "TestDataset" / "Kvasir", root / "TestDataset" / "Kvasir", 3)
    _copy_pairs(real_root / "TestDataset" / "CVC-ClinicDB", root / "TestDataset" / "CVC-ClinicDB", 3)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy neighbour cannot stall OpenMP's barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Every test on the real images (``real_root``, directly or through ``small_root``) is ``slow``:
    ``make test-fast`` runs the rest in under two minutes."""
    for item in items:
        if "real_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
